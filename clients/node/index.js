'use strict';
/**
 * @kimivl/client: a Node.js client for the Kimi-VL front door (kimivl.v1.ChatService).
 *
 *   const { KimiVLClient } = require('@kimivl/client');
 *   const client = new KimiVLClient('localhost:50051');
 *   for await (const ev of client.stream(['What is in this picture?', { imagePath: 'cat.jpg' }])) {
 *     if (ev.result) console.log(ev.result.usage);
 *     else process.stdout.write(ev.answer);
 *   }
 *   const r = await client.chat(['Describe', { imageUrl: 'https://example.com/a.jpg' }],
 *                               { sampling: { max_tokens: 256 } });
 *
 * The protos are loaded at run time from the repository's protos/ folder (option
 * `protoDir`) with keepCase: true, so every proto message the API hands back (the
 * `result`, `usage`, `timings`) keeps the .proto field names (`prompt_tokens`,
 * `finish_reason`), exactly as in the contract and the Python SDK's JSON.
 */
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { readErrorDetails, decodeStatus, STATUS_DETAILS_TRAILER } = require('./error-details');

const DEFAULT_PROTO_DIR = path.join(__dirname, '../../protos');
const PROTO_FILES = ['kimivl/v1/chat.proto', 'kimivl/v1/preprocess.proto', 'kimivl/v1/types.proto'];
const CHAT_SERVICE = 'kimivl.v1.ChatService';
const PREPROCESS_SERVICE = 'kimivl.v1.PreprocessService';
const MAX_MESSAGE_BYTES = 256 * 1024 * 1024;
const LOADER_OPTIONS = Object.freeze({ keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true });

/** Retry UNAVAILABLE (no inference tier reachable yet) before the first response. */
const SERVICE_CONFIG = Object.freeze({
  methodConfig: [{
    name: [{ service: CHAT_SERVICE }, { service: PREPROCESS_SERVICE }],
    retryPolicy: {
      maxAttempts: 3,
      initialBackoff: '0.2s',
      maxBackoff: '2s',
      backoffMultiplier: 2,
      retryableStatusCodes: ['UNAVAILABLE'],
    },
  }],
});

/** Channel options: retries on (with a buffer big enough for image-carrying requests), 256 MiB messages. */
const CHANNEL_OPTIONS = Object.freeze({
  'grpc.service_config': JSON.stringify(SERVICE_CONFIG),
  'grpc.enable_retries': 1,
  'grpc.per_rpc_retry_buffer_size': MAX_MESSAGE_BYTES,
  'grpc.retry_buffer_size': MAX_MESSAGE_BYTES,
  'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
});

const STATUS_NAMES = Object.fromEntries(
  Object.entries(grpc.status).filter(([, v]) => typeof v === 'number').map(([k, v]) => [v, k]));

// ---------------------------------------------------------------------------- errors
/**
 * A failed call: `code` is the gRPC status number, `codeName` its name, `details` the server's
 * message, `metadata` the trailers. What programs read (the google.rpc details the servers attach,
 * see error-details.js): `reason` (a stable code, e.g. 'LIMIT_EXCEEDED'), `errorInfo` ({reason,
 * domain, metadata}), `fieldViolations` ([{field, description}]), `quotaViolations` ([{subject,
 * description}]), `resourceInfo`, `retryAfterMs` (set where retrying helps) and `statusDetails`.
 */
class KimiVLError extends Error {
  constructor(code, details, metadata) {
    const codeName = STATUS_NAMES[code] || `STATUS_${code}`;
    super(`${codeName}: ${details}`);
    this.name = 'KimiVLError';
    this.code = code;
    this.codeName = codeName;
    this.details = details;
    this.metadata = metadata;
    Object.assign(this, readErrorDetails(metadata));
  }

  /** The error as plain data (what `JSON.stringify` writes); `statusDetails` is left out. */
  toJSON() {
    return {
      code: this.codeName, message: this.details, reason: this.reason, errorInfo: this.errorInfo,
      fieldViolations: this.fieldViolations, quotaViolations: this.quotaViolations, resourceInfo: this.resourceInfo,
      retryAfterMs: this.retryAfterMs,
    };
  }

  /** A KimiVLError from a grpc-js ServiceError (or anything thrown). */
  static from(err) {
    if (err instanceof KimiVLError) return err;
    if (err && typeof err.code === 'number') {
      return new KimiVLError(err.code, err.details != null ? err.details : String(err.message || ''), err.metadata);
    }
    return new KimiVLError(grpc.status.UNKNOWN, String(err && err.message ? err.message : err));
  }
}

// ---------------------------------------------------------------------------- protos
const _loaded = new Map();

/** The kimivl.v1 package (grpc object) loaded from `protoDir`; cached per directory. */
function loadProtos(protoDir = DEFAULT_PROTO_DIR) {
  const dir = path.resolve(protoDir);
  let pkg = _loaded.get(dir);
  if (!pkg) {
    for (const f of PROTO_FILES) {
      if (!fs.existsSync(path.join(dir, f))) {
        throw new Error(`kimivl protos not found: ${path.join(dir, f)} (set the protoDir option)`);
      }
    }
    const def = protoLoader.loadSync(PROTO_FILES, { ...LOADER_OPTIONS, includeDirs: [dir] });
    pkg = grpc.loadPackageDefinition(def).kimivl.v1;
    _loaded.set(dir, pkg);
  }
  return pkg;
}

// ---------------------------------------------------------------------------- requests
const ROLES = { system: 'ROLE_SYSTEM', user: 'ROLE_USER', assistant: 'ROLE_ASSISTANT' };
const SAMPLING_KEYS = {
  temperature: 'temperature', top_p: 'top_p', topP: 'top_p', top_k: 'top_k', topK: 'top_k',
  max_tokens: 'max_tokens', maxTokens: 'max_tokens', stop: 'stop', seed: 'seed',
  repetition_penalty: 'repetition_penalty', repetitionPenalty: 'repetition_penalty',
  ignore_eos: 'ignore_eos', ignoreEos: 'ignore_eos',
  frequency_penalty: 'frequency_penalty', frequencyPenalty: 'frequency_penalty',
  presence_penalty: 'presence_penalty', presencePenalty: 'presence_penalty',
};

function isBytes(x) {
  return Buffer.isBuffer(x) || x instanceof Uint8Array;
}

/**
 * One ContentPart (plain object, .proto field names) from a part:
 * a string (text), `{text}`, `{image: Buffer}`, a Buffer/Uint8Array (image bytes),
 * `{imageUrl}`, `{imageDataUri}` or `{imagePath}` (read here, sent as bytes).
 */
async function contentPart(part) {
  if (typeof part === 'string') return { text: part };
  if (isBytes(part)) return { image: { data: Buffer.from(part) } };
  if (part && typeof part === 'object') {
    if (typeof part.text === 'string') return { text: part.text };
    if (part.image !== undefined) {
      if (!isBytes(part.image)) throw new TypeError('{image} must be a Buffer or Uint8Array of an encoded image');
      return { image: { data: Buffer.from(part.image) } };
    }
    if (typeof part.imageUrl === 'string') {
      if (!/^https?:\/\//i.test(part.imageUrl)) throw new TypeError(`{imageUrl} must be http(s): ${part.imageUrl}`);
      return { image: { url: part.imageUrl } };
    }
    if (typeof part.imageDataUri === 'string') {
      if (!part.imageDataUri.startsWith('data:')) throw new TypeError('{imageDataUri} must start with "data:"');
      return { image: { data_uri: part.imageDataUri } };
    }
    if (typeof part.imagePath === 'string') return { image: { data: await fs.promises.readFile(part.imagePath) } };
  }
  throw new TypeError(`cannot use ${JSON.stringify(part)} as a content part: give a string, {text}, {image: Buffer}, ` +
    '{imageUrl}, {imageDataUri} or {imagePath}');
}

async function contentParts(parts) {
  const list = Array.isArray(parts) ? parts : [parts];
  const out = [];
  for (const p of list) out.push(await contentPart(p));
  return out;
}

/** SamplingParameters (plain object) from snake_case or camelCase keys; unset keys stay unset. */
function samplingParameters(sampling) {
  if (sampling == null) return null;
  const out = {};
  for (const [k, v] of Object.entries(sampling)) {
    const key = SAMPLING_KEYS[k];
    if (!key) throw new TypeError(`unknown sampling parameter: ${k}`);
    if (v !== undefined && v !== null) out[key] = v;
  }
  return out;
}

/**
 * A ChatRequest (plain object, .proto field names) for one user turn `parts`.
 * options: system, messages (earlier turns: [{role: 'user'|'assistant'|'system', content: parts}]),
 * sampling, excludeThinking, maxThinkingTokens, requestId.
 */
async function buildRequest(parts, options = {}) {
  const messages = [];
  if (options.system) messages.push({ role: 'ROLE_SYSTEM', content: [{ text: options.system }] });
  for (const m of options.messages || []) {
    const role = ROLES[m.role];
    if (!role) throw new TypeError(`unknown role: ${m.role}`);
    messages.push({ role, content: await contentParts(m.content) });
  }
  if (parts !== undefined && parts !== null) messages.push({ role: 'ROLE_USER', content: await contentParts(parts) });
  const thinking = { exclude_thinking: !!options.excludeThinking };
  if (options.maxThinkingTokens !== undefined && options.maxThinkingTokens !== null) {
    thinking.max_thinking_tokens = options.maxThinkingTokens;
  }
  const req = { conversation: { messages }, thinking, request_id: options.requestId || '' };
  const sampling = samplingParameters(options.sampling);
  if (sampling) req.sampling = sampling;
  return req;
}

// ---------------------------------------------------------------------------- results
const FINISH_REASONS = { FINISH_REASON_STOP: 'stop', FINISH_REASON_LENGTH: 'length', FINISH_REASON_ABORT: 'abort' };

function toEvent(msg) {
  if (msg.result) return { result: msg.result };
  const d = msg.delta || {};
  return { thinking: d.thinking || '', answer: d.answer || '', tokenIds: d.token_ids || [] };
}

function collect(events) {
  const thinking = [];
  const answer = [];
  const tokenIds = [];
  let result = null;
  for (const ev of events) {
    if (ev.result) {
      result = ev.result;
      continue;
    }
    thinking.push(ev.thinking);
    answer.push(ev.answer);
    for (const t of ev.tokenIds) tokenIds.push(t);
  }
  if (!result) throw new KimiVLError(grpc.status.UNKNOWN, 'the stream ended without a result');
  return {
    thinking: thinking.join(''),
    answer: answer.join(''),
    tokenIds,
    finishReason: FINISH_REASONS[result.finish_reason] || 'unspecified',
    endedInThinking: !!result.ended_in_thinking,
    thinkingBudgetReached: !!result.thinking_budget_reached,
    usage: result.usage,
    timings: result.timings,
    result,
  };
}

function toMetadata(...sources) {
  const md = new grpc.Metadata();
  for (const src of sources) {
    if (!src) continue;
    if (src instanceof grpc.Metadata) {
      for (const [k, vals] of Object.entries(src.getMap())) md.set(k, vals);
      continue;
    }
    const entries = Array.isArray(src) ? src : Object.entries(src);
    for (const [k, v] of entries) {
      for (const one of Array.isArray(v) ? v : [v]) md.add(k, one);
    }
  }
  return md;
}

// ---------------------------------------------------------------------------- client
class KimiVLClient {
  /**
   * @param {string} target host:port of the front door (default localhost:50051)
   * @param {object} [options] apiKey (sent with every call as `authorization: Bearer <apiKey>`, the front
   *   door's --api-keys-file), credentials (grpc ChannelCredentials; default insecure), tls (true: TLS with
   *   the system roots), metadata (sent with every call), deadlineMs (each call's deadline unless the call
   *   gives its own), protoDir (where kimivl/v1/*.proto are), channelOptions (extra grpc-js options)
   */
  constructor(target = 'localhost:50051', options = {}) {
    const { apiKey, credentials, tls, metadata, deadlineMs, protoDir, channelOptions } = options;
    this.target = target;
    this.proto = loadProtos(protoDir);
    const creds = credentials || (tls ? grpc.credentials.createSsl() : grpc.credentials.createInsecure());
    const chOpts = { ...CHANNEL_OPTIONS, ...(channelOptions || {}) };
    this.chatStub = new this.proto.ChatService(target, creds, chOpts);
    this.preprocessStub = new this.proto.PreprocessService(target, creds, {
      ...chOpts, channelOverride: this.chatStub.getChannel(),
    });
    this.metadata = apiKey ? toMetadata(metadata, { authorization: `Bearer ${apiKey}` }) : metadata;
    this.deadlineMs = deadlineMs;
  }

  _callOptions(opts) {
    const ms = opts.deadlineMs !== undefined ? opts.deadlineMs : this.deadlineMs;
    return ms ? { deadline: Date.now() + ms } : {};
  }

  /**
   * Streams the reply: events `{thinking, answer, tokenIds}`, then one `{result}` (a GenerationResult).
   * Leaving the loop early (break, return, throw) cancels the call. Errors throw KimiVLError.
   */
  async *stream(parts, opts = {}) {
    const request = opts.request || await buildRequest(parts, opts);
    const call = this.chatStub.Chat(request, toMetadata(this.metadata, opts.metadata), this._callOptions(opts));
    const queue = [];
    let error = null;
    let ended = false;
    let wake = null;
    const notify = () => {
      if (wake) {
        const w = wake;
        wake = null;
        w();
      }
    };
    call.on('data', (msg) => { queue.push(msg); notify(); });
    call.on('error', (err) => { if (!ended && !error) error = KimiVLError.from(err); notify(); });
    // 'end' comes after every message has been emitted; 'status' may come earlier, so it is not used.
    call.on('end', () => { ended = true; notify(); });
    let finished = false;
    try {
      for (;;) {
        if (queue.length) {
          yield toEvent(queue.shift());
          continue;
        }
        if (error) throw error;
        if (ended) break;
        await new Promise((resolve) => { wake = resolve; });
      }
      finished = true;
    } finally {
      if (!finished) call.cancel();
    }
  }

  /** The whole reply: {thinking, answer, tokenIds, finishReason, endedInThinking, usage, timings, result}. */
  async chat(parts, opts = {}) {
    const events = [];
    for await (const ev of this.stream(parts, opts)) events.push(ev);
    return collect(events);
  }

  /** PreprocessService.Preprocess: the prepared prompt for `parts` (dtype: 'TENSOR_DTYPE_BFLOAT16', ...). */
  async preprocess(parts, opts = {}) {
    const req = await buildRequest(parts, opts);
    const request = { conversation: req.conversation, dtype: opts.dtype || 'TENSOR_DTYPE_UNSPECIFIED' };
    return new Promise((resolve, reject) => {
      this.preprocessStub.Preprocess(request, toMetadata(this.metadata, opts.metadata), this._callOptions(opts),
        (err, resp) => (err ? reject(KimiVLError.from(err)) : resolve(resp)));
    });
  }

  /** Waits until the channel is connected (or the deadline passes). */
  waitForReady(deadlineMs = 10000) {
    return new Promise((resolve, reject) => {
      this.chatStub.waitForReady(Date.now() + deadlineMs, (err) => (err ? reject(err) : resolve()));
    });
  }

  close() {
    this.chatStub.close();
  }
}

module.exports = {
  KimiVLClient,
  KimiVLError,
  readErrorDetails,
  decodeStatus,
  STATUS_DETAILS_TRAILER,
  buildRequest,
  contentPart,
  samplingParameters,
  loadProtos,
  collect,
  toEvent,
  toMetadata,
  status: grpc.status,
  grpc,
  SERVICE_CONFIG,
  CHANNEL_OPTIONS,
  LOADER_OPTIONS,
  MAX_MESSAGE_BYTES,
  DEFAULT_PROTO_DIR,
  STATUS_NAMES,
};
