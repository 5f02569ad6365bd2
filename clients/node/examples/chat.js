#!/usr/bin/env node
'use strict';
/**
 * Stream a chat with Kimi-VL through the front door.
 *
 *   node examples/chat.js --target localhost:50051 "What is in this picture?" --image cat.jpg
 *
 * Text arguments and --image options keep their command-line order, so images interleave with
 * text (as `kimivl chat` does). Thinking and answer print apart, each line prefixed `[thinking] `
 * or `[answer] `, then a `[usage] ` line. `--json` writes one JSON object a line instead:
 * `{"thinking", "answer", "token_ids"}` per delta, then `{"result": {...}}` (.proto field names).
 * Exit codes: 0 done, 2 bad arguments, 3 a gRPC error (`error: CODE: details` on stderr, then the
 * error details' reason, field paths and retry delay; with --json also `{"error": {...}}` on stdout,
 * KimiVLError's toJSON()).
 */
const fs = require('node:fs');
const { KimiVLClient, KimiVLError } = require('..');

const EXIT_USAGE = 2;
const EXIT_RPC = 3;

const USAGE = `usage: node examples/chat.js [--target HOST:PORT] [--image PATH_OR_URL]... [options] TEXT...

Text and --image keep their order on the command line.

options:
  --target HOST:PORT          front door address (default localhost:50051)
  --image PATH_OR_URL         an image file, http(s) URL or data: URI; repeat to send several
  --system TEXT               system prompt
  --max-tokens N              most tokens to generate (thinking and answer together)
  --temperature T             0 = greedy; server range [0, 2]
  --top-p P                   nucleus mass, (0, 1]
  --top-k K
  --seed N
  --max-thinking-tokens N     thinking budget
  --no-thinking               do not stream thinking (it is still generated and counted)
  --timeout-s S               deadline for the whole call (default 600)
  --header KEY=VALUE          metadata sent with the call (repeatable)
  --api-key KEY               the front door's API key (default: $KIMIVL_API_KEY)
  --tls                       TLS with the system's root certificates
  --proto-dir DIR             where kimivl/v1/*.proto are (default: the repository's protos/)
  --json                      one JSON object a line: deltas, then the result
  -h, --help                  this help
`;

class UsageError extends Error {}

const VALUE_OPTIONS = {
  '--target': 'string', '--system': 'string', '--max-tokens': 'uint', '--temperature': 'number',
  '--top-p': 'number', '--top-k': 'uint', '--seed': 'uint', '--max-thinking-tokens': 'uint',
  '--timeout-s': 'number', '--header': 'string', '--proto-dir': 'string', '--api-key': 'string',
};
const FLAGS = ['--json', '--no-thinking', '--tls'];

function convert(name, kind, raw) {
  if (kind === 'string') return raw;
  const v = Number(raw);
  if (raw.trim() === '' || !Number.isFinite(v)) throw new UsageError(`${name}: not a number: ${raw}`);
  if (kind === 'uint' && (!Number.isInteger(v) || v < 0)) throw new UsageError(`${name}: not a whole number >= 0: ${raw}`);
  return v;
}

/** argv -> {parts: [['text'|'image', value]], opts}; throws UsageError. */
function parseArgs(argv) {
  const parts = [];
  const opts = { target: 'localhost:50051', header: [], 'timeout-s': 600 };
  for (let i = 0; i < argv.length; i++) {
    let tok = argv[i];
    if (tok === '--') {
      for (const t of argv.slice(i + 1)) parts.push(['text', t]);
      break;
    }
    if (tok === '-h' || tok === '--help') {
      opts.help = true;
      continue;
    }
    if (!tok.startsWith('--') || tok === '-') {
      if (tok.startsWith('-') && tok.length > 1 && !/^-\d/.test(tok)) throw new UsageError(`unknown option ${tok}`);
      parts.push(['text', tok]);
      continue;
    }
    let value;
    const eq = tok.indexOf('=');
    if (eq > 0) {
      value = tok.slice(eq + 1);
      tok = tok.slice(0, eq);
    }
    if (FLAGS.includes(tok)) {
      if (value !== undefined) throw new UsageError(`${tok} takes no value`);
      opts[tok.slice(2)] = true;
      continue;
    }
    const kind = tok === '--image' ? 'string' : VALUE_OPTIONS[tok];
    if (!kind) throw new UsageError(`unknown option ${tok}`);
    if (value === undefined) {
      if (i + 1 >= argv.length) throw new UsageError(`${tok} needs a value`);
      value = argv[++i];
    }
    if (tok === '--image') parts.push(['image', value]);
    else if (tok === '--header') opts.header.push(value);
    else opts[tok.slice(2)] = convert(tok, kind, value);
  }
  return { parts, opts };
}

function toPart([kind, value]) {
  if (kind === 'text') return value;
  if (/^https?:\/\//i.test(value)) return { imageUrl: value };
  if (value.startsWith('data:')) return { imageDataUri: value };
  let stat;
  try {
    stat = fs.statSync(value);
  } catch {
    throw new UsageError(`--image ${value}: no such file`);
  }
  if (!stat.isFile()) throw new UsageError(`--image ${value}: not a file`);
  return { imagePath: value };
}

function callOptions(opts) {
  const sampling = {};
  for (const [flag, key] of [['max-tokens', 'max_tokens'], ['temperature', 'temperature'], ['top-p', 'top_p'],
    ['top-k', 'top_k'], ['seed', 'seed']]) {
    if (opts[flag] !== undefined) sampling[key] = opts[flag];
  }
  const metadata = opts.header.map((h) => {
    const eq = h.indexOf('=');
    if (eq <= 0) throw new UsageError(`--header must be KEY=VALUE: ${h}`);
    return [h.slice(0, eq).toLowerCase(), h.slice(eq + 1)];
  });
  return {
    system: opts.system,
    sampling,
    excludeThinking: !!opts['no-thinking'],
    maxThinkingTokens: opts['max-thinking-tokens'],
    deadlineMs: opts['timeout-s'] > 0 ? opts['timeout-s'] * 1000 : undefined,
    metadata,
  };
}

function usageLine(r) {
  const u = r.usage || {};
  const t = r.timings || {};
  const reason = String(r.finish_reason).replace(/^FINISH_REASON_/, '').toLowerCase();
  const extra = (r.ended_in_thinking ? ' (ended while thinking)' : '') +
    (r.thinking_budget_reached ? ' (thinking budget reached)' : '');
  const ms = (x) => `${Math.round(x || 0)} ms`;
  return `[usage] ${reason}${extra}; prompt ${u.prompt_tokens} tokens (${u.image_tokens} image, ` +
    `${u.cached_prompt_tokens} cached); thinking ${u.thinking_tokens}; answer ${u.answer_tokens}; ` +
    `preprocess ${ms(t.preprocess_ms)}; first token ${ms(t.time_to_first_token_ms)}; total ${ms(t.total_ms)}`;
}

/** Writes streamed text with each line prefixed by its section, `[thinking] ` or `[answer] `. */
class SectionWriter {
  constructor(out) {
    this.out = out;
    this.section = null;
    this.atLineStart = true;
  }

  write(section, text) {
    if (!text) return;
    if (section !== this.section) {
      if (!this.atLineStart) this.out.write('\n');
      this.atLineStart = true;
      this.section = section;
    }
    const prefix = `[${section}] `;
    let buf = '';
    for (const line of text.split(/(?<=\n)/)) {
      if (this.atLineStart) buf += prefix;
      buf += line;
      this.atLineStart = line.endsWith('\n');
    }
    this.out.write(buf);
  }

  endLine() {
    if (!this.atLineStart) this.out.write('\n');
    this.atLineStart = true;
    this.section = null;
  }
}

async function run(client, parts, options, json) {
  const out = process.stdout;
  const writer = new SectionWriter(out);
  let gotResult = false;
  for await (const ev of client.stream(parts, options)) {
    if (ev.result) {
      gotResult = true;
      if (json) out.write(`${JSON.stringify({ result: ev.result })}\n`);
      else {
        writer.endLine();
        out.write(`${usageLine(ev.result)}\n`);
      }
    } else if (json) {
      out.write(`${JSON.stringify({ thinking: ev.thinking, answer: ev.answer, token_ids: ev.tokenIds })}\n`);
    } else {
      writer.write('thinking', ev.thinking);
      writer.write('answer', ev.answer);
    }
  }
  if (!gotResult) throw new KimiVLError(2 /* UNKNOWN */, 'the stream ended without a result');
}

/** `error: CODE: message`, then what the error's details add: its reason, field paths, when to retry. */
function errorLines(e) {
  const lines = [`error: ${e.codeName}: ${e.details}`];
  if (e.reason) lines.push(`  reason: ${e.reason}`);
  for (const v of e.fieldViolations) lines.push(`  field: ${v.field}`);
  if (e.retryAfterMs !== null) lines.push(`  retry after: ${e.retryAfterMs} ms`);
  return `${lines.join('\n')}\n`;
}

async function main(argv) {
  let parsed;
  let parts;
  let options;
  try {
    parsed = parseArgs(argv);
    if (parsed.opts.help) {
      process.stdout.write(USAGE);
      return 0;
    }
    if (!parsed.parts.length) throw new UsageError('give some text and/or --image');
    parts = parsed.parts.map(toPart);
    options = callOptions(parsed.opts);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    process.stderr.write(`chat.js: ${e.message}\n\n${USAGE}`);
    return EXIT_USAGE;
  }
  const { opts } = parsed;
  const apiKey = opts['api-key'] !== undefined ? opts['api-key'] : process.env.KIMIVL_API_KEY;
  const client = new KimiVLClient(opts.target, { apiKey, tls: !!opts.tls, protoDir: opts['proto-dir'] });
  try {
    await run(client, parts, options, !!opts.json);
    return 0;
  } catch (e) {
    if (!(e instanceof KimiVLError)) throw e;
    if (opts.json) process.stdout.write(`${JSON.stringify({ error: e })}\n`);
    process.stderr.write(errorLines(e));
    return EXIT_RPC;
  } finally {
    client.close();
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => { process.exitCode = code; }, (e) => {
    process.stderr.write(`chat.js: ${e && e.stack ? e.stack : e}\n`);
    process.exitCode = 1;
  });
}

module.exports = { parseArgs, toPart, callOptions, usageLine, errorLines, SectionWriter, main };
