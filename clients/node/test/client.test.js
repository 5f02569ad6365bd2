'use strict';
// KimiVLClient against an in-process fake ChatService: streaming, errors, metadata, retries,
// deadlines and cancellation.
const test = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');
const { KimiVLClient, KimiVLError } = require('..');
const { startFakeServer, replay } = require('./fake-server');

const DELTAS = [
  { thinking: 'Let me look', token_ids: [11, 12] },
  { thinking: '.', answer: 'An astronaut', token_ids: [13, 14, 15] },
  { answer: '.', token_ids: [16] },
];

test('stream yields deltas then the result; chat collects them', async (t) => {
  let seen;
  const srv = await startFakeServer((call) => {
    seen = call.request;
    replay(DELTAS)(call);
  });
  t.after(() => srv.close());
  const client = new KimiVLClient(srv.target);
  t.after(() => client.close());

  const events = [];
  for await (const ev of client.stream(['Describe', { image: Buffer.from([1, 2, 3]) }], { sampling: { temperature: 0, max_tokens: 6 } })) {
    events.push(ev);
  }
  assert.equal(events.length, 4);
  assert.deepEqual(events[0], { thinking: 'Let me look', answer: '', tokenIds: [11, 12] });
  assert.equal(events[3].result.finish_reason, 'FINISH_REASON_LENGTH');
  assert.equal(events[3].result.usage.prompt_tokens, 100);
  assert.equal(seen.conversation.messages[0].content[1].image.data.length, 3);
  assert.equal(seen.sampling.temperature, 0);
  assert.equal(seen.sampling._temperature, 'temperature');

  const r = await client.chat('Describe');
  assert.equal(r.thinking, 'Let me look.');
  assert.equal(r.answer, 'An astronaut.');
  assert.deepEqual(r.tokenIds, [11, 12, 13, 14, 15, 16]);
  assert.equal(r.finishReason, 'length');
  assert.equal(r.usage.thinking_tokens + r.usage.answer_tokens, 6);
  assert.equal(r.timings.preprocess_ms, 1.5);
});

test('errors are KimiVLError with code, codeName and details', async (t) => {
  const srv = await startFakeServer((call) => {
    call.emit('error', { code: grpc.status.INVALID_ARGUMENT, details: 'sampling.temperature: 5 is not in [0, 2]' });
  });
  t.after(() => srv.close());
  const client = new KimiVLClient(srv.target);
  t.after(() => client.close());
  await assert.rejects(client.chat('x', { sampling: { temperature: 5 } }), (e) => {
    assert.ok(e instanceof KimiVLError);
    assert.equal(e.code, 3);
    assert.equal(e.codeName, 'INVALID_ARGUMENT');
    assert.equal(e.details, 'sampling.temperature: 5 is not in [0, 2]');
    return true;
  });
});

test('an error after some deltas still throws, after the deltas', async (t) => {
  const srv = await startFakeServer((call) => {
    call.write({ delta: DELTAS[0] });
    setTimeout(() => call.emit('error', { code: grpc.status.INTERNAL, details: 'engine died' }), 20);
  });
  t.after(() => srv.close());
  const client = new KimiVLClient(srv.target);
  t.after(() => client.close());
  const got = [];
  await assert.rejects(async () => {
    for await (const ev of client.stream('x')) got.push(ev);
  }, { codeName: 'INTERNAL', details: 'engine died' });
  assert.equal(got.length, 1);
});

test('client and call metadata are sent', async (t) => {
  let md;
  const srv = await startFakeServer((call) => {
    md = call.metadata.getMap();
    replay(DELTAS)(call);
  });
  t.after(() => srv.close());
  const client = new KimiVLClient(srv.target, { metadata: { authorization: 'Bearer t' } });
  t.after(() => client.close());
  await client.chat('x', { metadata: { 'x-tenant': 'a' } });
  assert.equal(md.authorization, 'Bearer t');
  assert.equal(md['x-tenant'], 'a');
});

test('apiKey is sent as authorization: Bearer on chat and preprocess', async (t) => {
  const seen = [];
  const proto = require('..').loadProtos();
  const srv = await startFakeServer((call) => {
    seen.push(call.metadata.get('authorization'));
    replay(DELTAS)(call);
  });
  srv.server.addService(proto.PreprocessService.service, {
    Preprocess: (call, cb) => {
      seen.push(call.metadata.get('authorization'));
      cb(null, { prompt: { token_ids: [1] } });
    },
  });
  t.after(() => srv.close());
  const client = new KimiVLClient(srv.target, { apiKey: 'k-1', metadata: { 'x-tenant': 'a' } });
  t.after(() => client.close());
  await client.chat('x');
  await client.preprocess('x');
  assert.deepEqual(seen, [['Bearer k-1'], ['Bearer k-1']]);
  const plain = new KimiVLClient(srv.target);
  t.after(() => plain.close());
  await plain.chat('x');
  assert.deepEqual(seen[2], [], 'no apiKey, no authorization header');
});

test('UNAVAILABLE before the first response is retried', async (t) => {
  let attempts = 0;
  const srv = await startFakeServer((call) => {
    attempts += 1;
    if (attempts < 3) call.emit('error', { code: grpc.status.UNAVAILABLE, details: 'no inference tier' });
    else replay(DELTAS)(call);
  });
  t.after(() => srv.close());
  const client = new KimiVLClient(srv.target);
  t.after(() => client.close());
  const r = await client.chat(['x', { image: Buffer.alloc(1 << 20, 7) }]);
  assert.equal(attempts, 3);
  assert.equal(r.answer, 'An astronaut.');

  attempts = -10;
  await assert.rejects(client.chat('x'), { codeName: 'UNAVAILABLE', details: 'no inference tier' });
  assert.equal(attempts, -7, 'three attempts, then the error');
});

test('deadlineMs gives DEADLINE_EXCEEDED', async (t) => {
  const srv = await startFakeServer(() => {});
  t.after(() => srv.close());
  const client = new KimiVLClient(srv.target, { deadlineMs: 100 });
  t.after(() => client.close());
  await assert.rejects(client.chat('x'), { codeName: 'DEADLINE_EXCEEDED' });
  await assert.rejects(client.chat('x', { deadlineMs: 50 }), { code: grpc.status.DEADLINE_EXCEEDED });
});

test('breaking out of the loop cancels the call', async (t) => {
  let cancelled;
  const cancelledP = new Promise((resolve) => { cancelled = resolve; });
  const srv = await startFakeServer((call) => {
    call.on('cancelled', () => cancelled(true));
    call.write({ delta: DELTAS[0] });
    const timer = setInterval(() => call.write({ delta: { answer: 'x', token_ids: [1] } }), 10);
    call.on('cancelled', () => clearInterval(timer));
  });
  t.after(() => srv.close());
  const client = new KimiVLClient(srv.target);
  t.after(() => client.close());
  let n = 0;
  for await (const ev of client.stream('x')) {
    assert.ok(!ev.result);
    if (++n === 3) break;
  }
  assert.equal(await Promise.race([cancelledP, new Promise((r) => setTimeout(() => r(false), 2000))]), true);
});
