'use strict';
// KimiVLError's google.rpc details through a real grpc-js call to an in-process fake ChatService
// that answers with a grpc-status-details-bin trailer (the real front door's are checked by
// tests/test_node_errors.py).
const test = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');
const { KimiVLClient, KimiVLError, readErrorDetails, STATUS_DETAILS_TRAILER } = require('..');
const { rpcRoot } = require('../error-details');
const { startFakeServer } = require('./fake-server');

const TYPE_PREFIX = 'type.googleapis.com/';

function any(name, fields) {
  const type = rpcRoot().lookupType(name);
  return { type_url: TYPE_PREFIX + name, value: type.encode(type.fromObject(fields)).finish() };
}

function statusBlob(code, message, details) {
  const Status = rpcRoot().lookupType('google.rpc.Status');
  return Buffer.from(Status.encode(Status.fromObject({ code, message, details })).finish());
}

function trailers(blob) {
  const md = new grpc.Metadata();
  md.set(STATUS_DETAILS_TRAILER, blob);
  return md;
}

async function refusal(t, code, details, metadata) {
  const srv = await startFakeServer((call) => call.emit('error', { code, details, metadata }));
  t.after(() => srv.close());
  const client = new KimiVLClient(srv.target, { channelOptions: { 'grpc.enable_retries': 0 } });
  t.after(() => client.close());
  try {
    await client.chat('x');
  } catch (e) {
    return e;
  }
  throw new Error('the call did not fail');
}

test('a limit: reason, field path, quota violation, resource info', async (t) => {
  const msg = 'conversation.messages[0].content[1].image: 9000000 bytes; the limit is 8388608';
  const field = 'conversation.messages[0].content[1].image';
  const blob = statusBlob(grpc.status.RESOURCE_EXHAUSTED, msg, [
    any('google.rpc.ErrorInfo', { reason: 'LIMIT_EXCEEDED', domain: 'kimivl', metadata: { field, limit: '8388608' } }),
    any('google.rpc.BadRequest', { field_violations: [{ field, description: msg }] }),
    any('google.rpc.QuotaFailure', { violations: [{ subject: field, description: msg }] }),
    any('google.rpc.ResourceInfo', { resource_type: 'image', resource_name: field, description: 'limit 8388608' }),
  ]);
  const e = await refusal(t, grpc.status.RESOURCE_EXHAUSTED, msg, trailers(blob));
  assert.ok(e instanceof KimiVLError);
  assert.equal(e.codeName, 'RESOURCE_EXHAUSTED');
  assert.equal(e.reason, 'LIMIT_EXCEEDED');
  assert.deepEqual(e.errorInfo, { reason: 'LIMIT_EXCEEDED', domain: 'kimivl', metadata: { field, limit: '8388608' } });
  assert.deepEqual(e.fieldViolations, [{ field, description: msg }]);
  assert.deepEqual(e.quotaViolations, [{ subject: field, description: msg }]);
  assert.deepEqual(e.resourceInfo, { resourceType: 'image', resourceName: field, owner: '', description: 'limit 8388608' });
  assert.equal(e.retryAfterMs, null);
  assert.deepEqual(e.statusDetails.map((d) => d['@type']), ['ErrorInfo', 'BadRequest', 'QuotaFailure', 'ResourceInfo']
    .map((n) => `${TYPE_PREFIX}google.rpc.${n}`));
  const json = JSON.parse(JSON.stringify(e));
  assert.equal(json.code, 'RESOURCE_EXHAUSTED');
  assert.equal(json.message, msg);
  assert.equal(json.reason, 'LIMIT_EXCEEDED');
  assert.equal(json.statusDetails, undefined);
});

test('RetryInfo becomes retryAfterMs; an unknown detail type keeps its bytes', async (t) => {
  const blob = statusBlob(grpc.status.UNAVAILABLE, 'draining', [
    any('google.rpc.ErrorInfo', { reason: 'UNAVAILABLE', domain: 'kimivl' }),
    any('google.rpc.RetryInfo', { retry_delay: { seconds: 1, nanos: 500000000 } }),
    { type_url: `${TYPE_PREFIX}example.v1.Unheard`, value: Buffer.from([8, 1]) },
  ]);
  const e = await refusal(t, grpc.status.UNAVAILABLE, 'draining', trailers(blob));
  assert.equal(e.reason, 'UNAVAILABLE');
  assert.equal(e.retryAfterMs, 1500);
  assert.deepEqual(e.statusDetails[2], { '@type': `${TYPE_PREFIX}example.v1.Unheard`, value: Buffer.from([8, 1]) });
});

test('no details, or details that do not decode, leave the code and message as they are', async (t) => {
  for (const md of [undefined, trailers(Buffer.from([0xff, 0xff, 0xff]))]) {
    const e = await refusal(t, grpc.status.INTERNAL, 'boom', md);
    assert.equal(e.codeName, 'INTERNAL');
    assert.equal(e.details, 'boom');
    assert.equal(e.reason, null);
    assert.deepEqual(e.fieldViolations, []);
    assert.equal(e.retryAfterMs, null);
  }
  assert.deepEqual(readErrorDetails(null).statusDetails, []);
  assert.equal(new KimiVLError(grpc.status.UNKNOWN, 'x').reason, null);
});
