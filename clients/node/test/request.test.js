'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const kimivl = require('..');

const { buildRequest, loadProtos, samplingParameters, KimiVLError } = kimivl;
const chatMethod = () => loadProtos().ChatService.service.Chat;
const roundTrip = (req) => chatMethod().requestDeserialize(chatMethod().requestSerialize(req));

test('loads the repository protos with the documented options', () => {
  const p = loadProtos();
  assert.equal(typeof p.ChatService, 'function');
  assert.equal(typeof p.PreprocessService, 'function');
  assert.equal(p.ChatService.service.Chat.path, '/kimivl.v1.ChatService/Chat');
  assert.equal(p.ChatService.service.Chat.responseStream, true);
  assert.deepEqual({ ...kimivl.LOADER_OPTIONS },
    { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true });
  assert.equal(loadProtos(), p, 'cached per directory');
});

test('a missing proto dir is a clear error', () => {
  assert.throws(() => loadProtos(path.join(os.tmpdir(), 'no-such-protos')), /kimivl protos not found/);
  assert.throws(() => new kimivl.KimiVLClient('localhost:1', { protoDir: '/nonexistent' }), /protoDir/);
});

test('parts become ordered content parts of one user turn', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kimivl-'));
  const file = path.join(dir, 'a.jpg');
  fs.writeFileSync(file, Buffer.from([0xff, 0xd8, 0xff, 0x00]));
  const req = await buildRequest([
    'Compare', { image: Buffer.from([1, 2]) }, 'with', { imagePath: file }, { imageUrl: 'https://example.com/b.png' },
    { imageDataUri: 'data:image/png;base64,AAAA' }, new Uint8Array([9]), { text: 'briefly' },
  ]);
  const back = roundTrip(req);
  assert.equal(back.input, 'conversation');
  const [msg] = back.conversation.messages;
  assert.equal(msg.role, 'ROLE_USER');
  assert.deepEqual(msg.content.map((c) => c.part), ['text', 'image', 'text', 'image', 'image', 'image', 'image', 'text']);
  assert.equal(msg.content[0].text, 'Compare');
  assert.deepEqual([...msg.content[1].image.data], [1, 2]);
  assert.deepEqual([...msg.content[3].image.data], [0xff, 0xd8, 0xff, 0x00]);
  assert.equal(msg.content[4].image.url, 'https://example.com/b.png');
  assert.equal(msg.content[5].image.data_uri, 'data:image/png;base64,AAAA');
  assert.equal(msg.content[6].image.source, 'data');
  assert.equal(msg.content[7].text, 'briefly');
});

test('system prompt, earlier turns and thinking options', async () => {
  const req = await buildRequest('and now?', {
    system: 'Be brief.', messages: [{ role: 'user', content: ['hi'] }, { role: 'assistant', content: 'hello' }],
    excludeThinking: true, maxThinkingTokens: 0, requestId: 'r-1',
  });
  const back = roundTrip(req);
  assert.deepEqual(back.conversation.messages.map((m) => m.role), ['ROLE_SYSTEM', 'ROLE_USER', 'ROLE_ASSISTANT', 'ROLE_USER']);
  assert.equal(back.thinking.exclude_thinking, true);
  assert.equal(back.thinking._max_thinking_tokens, 'max_thinking_tokens', 'a zero budget is sent, not dropped');
  assert.equal(back.request_id, 'r-1');
  await assert.rejects(buildRequest('x', { messages: [{ role: 'robot', content: 'x' }] }), /unknown role/);
});

test('sampling keeps presence (temperature 0 is sent) and takes camelCase too', async () => {
  const back = roundTrip(await buildRequest('x', { sampling: { temperature: 0, maxTokens: 12, top_p: 0.5, seed: 7, stop: ['\n'] } }));
  assert.equal(back.sampling._temperature, 'temperature');
  assert.equal(back.sampling.temperature, 0);
  assert.equal(back.sampling.max_tokens, 12);
  assert.equal(back.sampling.seed, 7);
  assert.deepEqual(back.sampling.stop, ['\n']);
  assert.equal(back.sampling._top_k, undefined, 'unset stays unset (server default)');
  const none = roundTrip(await buildRequest('x'));
  assert.equal(none.sampling, null);
  assert.throws(() => samplingParameters({ temprature: 1 }), /unknown sampling parameter: temprature/);
});

test('bad parts are a TypeError', async () => {
  await assert.rejects(buildRequest([42]), TypeError);
  await assert.rejects(buildRequest([{ image: 'not bytes' }]), TypeError);
  await assert.rejects(buildRequest([{ imageUrl: 'file:///etc/passwd' }]), TypeError);
  await assert.rejects(buildRequest([{ imageDataUri: 'iVBOR' }]), TypeError);
  await assert.rejects(buildRequest([{ imagePath: '/no/such/file.jpg' }]), { code: 'ENOENT' });
});

test('retry service config and channel options', () => {
  const cfg = JSON.parse(kimivl.CHANNEL_OPTIONS['grpc.service_config']);
  const [mc] = cfg.methodConfig;
  assert.deepEqual(mc.name.map((n) => n.service), ['kimivl.v1.ChatService', 'kimivl.v1.PreprocessService']);
  assert.equal(mc.retryPolicy.maxAttempts, 3);
  assert.deepEqual(mc.retryPolicy.retryableStatusCodes, ['UNAVAILABLE']);
  assert.equal(kimivl.CHANNEL_OPTIONS['grpc.enable_retries'], 1);
  assert.equal(kimivl.CHANNEL_OPTIONS['grpc.per_rpc_retry_buffer_size'], 256 << 20);
  assert.equal(kimivl.CHANNEL_OPTIONS['grpc.max_send_message_length'], 256 << 20);
  assert.equal(kimivl.CHANNEL_OPTIONS['grpc.max_receive_message_length'], 256 << 20);
});

test('KimiVLError carries the status number, its name and the details', () => {
  const e = KimiVLError.from({ code: 3, details: 'sampling.temperature: 5 is out of range [0, 2]', message: 'x' });
  assert.ok(e instanceof Error && e instanceof KimiVLError);
  assert.equal(e.code, 3);
  assert.equal(e.codeName, 'INVALID_ARGUMENT');
  assert.equal(e.details, 'sampling.temperature: 5 is out of range [0, 2]');
  assert.equal(e.message, 'INVALID_ARGUMENT: sampling.temperature: 5 is out of range [0, 2]');
  assert.equal(KimiVLError.from(new Error('boom')).codeName, 'UNKNOWN');
});

test('collect joins deltas and names the finish reason', () => {
  const r = kimivl.collect([
    { thinking: 'a', answer: '', tokenIds: [1] }, { thinking: 'b', answer: 'c', tokenIds: [2, 3] },
    { result: { finish_reason: 'FINISH_REASON_STOP', ended_in_thinking: false, usage: { answer_tokens: 1 }, timings: null } },
  ]);
  assert.equal(r.thinking, 'ab');
  assert.equal(r.answer, 'c');
  assert.deepEqual(r.tokenIds, [1, 2, 3]);
  assert.equal(r.finishReason, 'stop');
  assert.throws(() => kimivl.collect([{ thinking: 'a', answer: '', tokenIds: [] }]), /without a result/);
});
