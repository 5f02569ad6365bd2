'use strict';
/**
 * The google.rpc error details a kimivl server attaches to a refusal, read from the
 * `grpc-status-details-bin` trailer: a google.rpc.Status whose `details` are Any-packed
 * ErrorInfo (a stable `reason`), BadRequest (field paths), QuotaFailure and ResourceInfo (limits)
 * and RetryInfo (when to retry). Decoded with protobufjs from googleapis' two google/rpc protos,
 * vendored unchanged in vendor/google/rpc (Apache-2.0, ~10 KB; the package that ships them,
 * google-proto-files, installs 88 MB of every Google API for these two files).
 */
const path = require('node:path');
const protobuf = require('protobufjs');

const STATUS_DETAILS_TRAILER = 'grpc-status-details-bin';
const RPC_PROTOS = ['google/rpc/status.proto', 'google/rpc/error_details.proto'];
// Decoded details keep their .proto field names, like every proto message this client hands back.
const TO_OBJECT = Object.freeze({ longs: Number, enums: String, bytes: Buffer, defaults: true });

let root = null;

/** The protobufjs Root holding google.rpc.Status and the error detail types (loaded once). */
function rpcRoot() {
  if (!root) {
    const dir = path.join(__dirname, 'vendor');
    // google/protobuf/{any,duration}.proto come from protobufjs's bundled copies.
    root = new protobuf.Root().loadSync(RPC_PROTOS.map((f) => path.join(dir, f)), { keepCase: true });
  }
  return root;
}

/** The message name of an Any's type URL (`type.googleapis.com/google.rpc.ErrorInfo` -> `google.rpc.ErrorInfo`). */
function typeName(typeUrl) {
  return typeUrl.slice(typeUrl.lastIndexOf('/') + 1);
}

/** One Any as a plain object: `{'@type': type_url, ...fields}`; a type we do not know keeps its bytes as `value`. */
function unpackAny(any) {
  let type = null;
  try {
    type = rpcRoot().lookupType(typeName(any.type_url));
  } catch {
    return { '@type': any.type_url, value: Buffer.from(any.value) };
  }
  return { '@type': any.type_url, ...type.toObject(type.decode(any.value), TO_OBJECT) };
}

/** A google.rpc.Status (the trailer's bytes) as `{code, message, details: [unpacked Any]}`. */
function decodeStatus(blob) {
  const Status = rpcRoot().lookupType('google.rpc.Status');
  const status = Status.decode(blob);
  return { code: status.code, message: status.message, details: status.details.map(unpackAny) };
}

function durationMs(d) {
  return d ? Number(d.seconds || 0) * 1000 + Number(d.nanos || 0) / 1e6 : 0;
}

/**
 * What programs read from a refusal's details: `reason` and `errorInfo` ({reason, domain,
 * metadata}), `fieldViolations` [{field, description}], `quotaViolations` [{subject,
 * description}], `resourceInfo` ({resourceType, resourceName, owner, description}, the first),
 * `retryAfterMs` (RetryInfo's delay) and `statusDetails` (every detail, unpacked). Fields with no
 * detail behind them are null or empty.
 */
function summarize(details) {
  const out = {
    reason: null, errorInfo: null, fieldViolations: [], quotaViolations: [], resourceInfo: null, retryAfterMs: null,
    statusDetails: details,
  };
  for (const d of details) {
    switch (typeName(d['@type'])) {
      case 'google.rpc.ErrorInfo':
        out.reason = d.reason;
        out.errorInfo = { reason: d.reason, domain: d.domain, metadata: { ...d.metadata } };
        break;
      case 'google.rpc.BadRequest':
        for (const v of d.field_violations) out.fieldViolations.push({ field: v.field, description: v.description });
        break;
      case 'google.rpc.QuotaFailure':
        for (const v of d.violations) out.quotaViolations.push({ subject: v.subject, description: v.description });
        break;
      case 'google.rpc.ResourceInfo':
        if (!out.resourceInfo) {
          out.resourceInfo = { resourceType: d.resource_type, resourceName: d.resource_name, owner: d.owner,
            description: d.description };
        }
        break;
      case 'google.rpc.RetryInfo':
        out.retryAfterMs = durationMs(d.retry_delay);
        break;
      default:
        break;
    }
  }
  return out;
}

/**
 * The details of a call's trailing metadata (a grpc-js Metadata, or anything with `get(key)`).
 * No trailer, or one that does not decode, gives the empty summary: the status code and message
 * stay the error, whatever its details.
 */
function readErrorDetails(metadata) {
  const blobs = metadata && typeof metadata.get === 'function' ? metadata.get(STATUS_DETAILS_TRAILER) : [];
  if (!blobs || !blobs.length) return summarize([]);
  try {
    return summarize(decodeStatus(Buffer.from(blobs[0])).details);
  } catch {
    return summarize([]);
  }
}

module.exports = { STATUS_DETAILS_TRAILER, readErrorDetails, decodeStatus, summarize, rpcRoot };
