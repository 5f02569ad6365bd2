'use strict';
// examples/chat.js: argument parsing, the sectioned output, and the exit codes against a fake server.
const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { execFile } = require('node:child_process');
const grpc = require('@grpc/grpc-js');
const { parseArgs, SectionWriter } = require('../examples/chat');
const { startFakeServer, replay } = require('./fake-server');

const CHAT = path.join(__dirname, '..', 'examples', 'chat.js');

function runChat(args) {
  return new Promise((resolve) => {
    execFile(process.execPath, [CHAT, ...args], { timeout: 30000 }, (err, stdout, stderr) => {
      resolve({ code: err ? err.code : 0, stdout, stderr });
    });
  });
}

test('text and --image keep their command-line order', () => {
  const { parts, opts } = parseArgs(['Compare', '--image', 'a.jpg', 'with', '--image=b.png', '--max-tokens', '12',
    '--temperature=0', '--json', '--target', 'h:1', '--', '--literal']);
  assert.deepEqual(parts, [['text', 'Compare'], ['image', 'a.jpg'], ['text', 'with'], ['image', 'b.png'], ['text', '--literal']]);
  assert.equal(opts['max-tokens'], 12);
  assert.equal(opts.temperature, 0);
  assert.equal(opts.json, true);
  assert.equal(opts.target, 'h:1');
  assert.throws(() => parseArgs(['--max-tokens', '1.5']), /whole number/);
  assert.throws(() => parseArgs(['--temperature', 'hot']), /not a number/);
  assert.throws(() => parseArgs(['--bogus']), /unknown option/);
  assert.throws(() => parseArgs(['--target']), /needs a value/);
});

test('thinking and answer lines are prefixed apart', () => {
  let out = '';
  const w = new SectionWriter({ write: (s) => { out += s; } });
  w.write('thinking', 'Let me\nlook');
  w.write('thinking', ' closer.');
  w.write('answer', 'An astronaut');
  w.write('answer', '.\nDone.');
  w.endLine();
  assert.equal(out, '[thinking] Let me\n[thinking] look closer.\n[answer] An astronaut.\n[answer] Done.\n');
});

const DELTAS = [{ thinking: 'hm', token_ids: [1, 2] }, { answer: 'A cat.', token_ids: [3] }];

test('--json prints deltas then the result; the plain view prints sections and usage', async (t) => {
  const srv = await startFakeServer(replay(DELTAS));
  t.after(() => srv.close());
  const j = await runChat(['--json', '--target', srv.target, 'Describe', '--max-tokens', '3']);
  assert.equal(j.code, 0, j.stderr);
  const lines = j.stdout.trim().split('\n').map((l) => JSON.parse(l));
  assert.deepEqual(lines.slice(0, 2), [{ thinking: 'hm', answer: '', token_ids: [1, 2] }, { thinking: '', answer: 'A cat.', token_ids: [3] }]);
  assert.equal(lines[2].result.usage.prompt_tokens, 100);
  assert.equal(lines[2].result.finish_reason, 'FINISH_REASON_LENGTH');

  const p = await runChat(['--target', srv.target, 'Describe']);
  assert.equal(p.code, 0, p.stderr);
  assert.match(p.stdout, /^\[thinking\] hm\n\[answer\] A cat\.\n\[usage\] length; prompt 100 tokens \(64 image, 0 cached\); thinking 2; answer 1;/);
});

test('a gRPC error exits 3 with "error: CODE: details"', async (t) => {
  const srv = await startFakeServer((call) => call.emit('error', { code: grpc.status.INVALID_ARGUMENT, details: 'sampling.temperature: out of range' }));
  t.after(() => srv.close());
  const r = await runChat(['--target', srv.target, '--temperature', '5', 'hi']);
  assert.equal(r.code, 3);
  assert.equal(r.stderr, 'error: INVALID_ARGUMENT: sampling.temperature: out of range\n');
});

test('bad arguments exit 2', async () => {
  assert.equal((await runChat([])).code, 2);
  assert.equal((await runChat(['--max-tokens', 'many', 'hi'])).code, 2);
  const r = await runChat(['--image', '/no/such/image.jpg', 'hi']);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /no such file/);
});
