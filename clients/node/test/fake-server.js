'use strict';
// An in-process kimivl.v1.ChatService for the unit tests (no real tiers needed).
const grpc = require('@grpc/grpc-js');
const { loadProtos } = require('..');

/** Starts a server whose Chat handler is `chat(call)`; resolves {target, server, close()}. */
async function startFakeServer(chat) {
  const proto = loadProtos();
  const server = new grpc.Server({ 'grpc.max_receive_message_length': 256 << 20 });
  server.addService(proto.ChatService.service, { Chat: chat });
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p)));
  });
  return {
    target: `127.0.0.1:${port}`,
    server,
    close: () => new Promise((resolve) => server.tryShutdown(() => resolve())),
  };
}

/** Streams `deltas` then a result with usage counted from them. */
function replay(deltas, extra = {}) {
  return (call) => {
    for (const d of deltas) call.write({ delta: d });
    const n = deltas.reduce((a, d) => a + (d.token_ids || []).length, 0);
    call.write({
      result: {
        finish_reason: 'FINISH_REASON_LENGTH',
        usage: { prompt_tokens: 100, image_tokens: 64, thinking_tokens: n - 1, answer_tokens: 1 },
        timings: { preprocess_ms: 1.5, time_to_first_token_ms: 2, total_ms: 3 },
        ...extra,
      },
    });
    call.end();
  };
}

module.exports = { startFakeServer, replay };
