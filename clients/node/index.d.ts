// Typings for @kimivl/client. Proto messages keep their .proto field names (keepCase: true);
// enums are their names as strings; 64-bit integers are numbers.
import * as grpc from '@grpc/grpc-js';

/** One piece of a user turn, in order. A bare Buffer/Uint8Array is image bytes. */
export type Part =
  | string
  | Buffer
  | Uint8Array
  | { text: string }
  | { image: Buffer | Uint8Array }
  | { imageUrl: string }
  | { imageDataUri: string }
  | { imagePath: string };

export type Role = 'system' | 'user' | 'assistant';

/** SamplingParameters; snake_case (as in the proto) or camelCase keys. Unset keys take server defaults. */
export interface Sampling {
  temperature?: number;
  top_p?: number;
  topP?: number;
  top_k?: number;
  topK?: number;
  max_tokens?: number;
  maxTokens?: number;
  stop?: string[];
  seed?: number;
  repetition_penalty?: number;
  repetitionPenalty?: number;
  ignore_eos?: boolean;
  ignoreEos?: boolean;
  frequency_penalty?: number;
  frequencyPenalty?: number;
  presence_penalty?: number;
  presencePenalty?: number;
}

export type MetadataInit = grpc.Metadata | Record<string, string | Buffer | Array<string | Buffer>> | Array<[string, string | Buffer]>;

export interface RequestOptions {
  /** A system prompt, sent first. */
  system?: string;
  /** Earlier turns, before `parts`. */
  messages?: Array<{ role: Role; content: Part | Part[] }>;
  sampling?: Sampling;
  /** Do not stream thinking text (it is still generated and counted). */
  excludeThinking?: boolean;
  /** Thinking budget; then the server closes the thinking segment. */
  maxThinkingTokens?: number;
  requestId?: string;
}

export interface CallOptions extends RequestOptions {
  /** This call's deadline in milliseconds from now (overrides the client's). */
  deadlineMs?: number;
  /** Metadata added to the client's for this call. */
  metadata?: MetadataInit;
  /** A ready ChatRequest (plain object, .proto field names) used instead of parts and options. */
  request?: ChatRequest;
}

export interface ClientOptions {
  /** The front door's API key, sent with every call as `authorization: Bearer <apiKey>`. */
  apiKey?: string;
  /** Default: insecure. */
  credentials?: grpc.ChannelCredentials;
  /** TLS with the system roots (ignored when `credentials` is given). */
  tls?: boolean;
  /** Sent with every call, e.g. { authorization: 'Bearer ...' }. */
  metadata?: MetadataInit;
  /** Each call's deadline in milliseconds unless the call gives its own. */
  deadlineMs?: number;
  /** The folder holding kimivl/v1/*.proto. Default: path.join(__dirname, '../../protos'). */
  protoDir?: string;
  /** Extra grpc-js channel options (override the defaults). */
  channelOptions?: grpc.ChannelOptions;
}

export type FinishReasonName = 'FINISH_REASON_UNSPECIFIED' | 'FINISH_REASON_STOP' | 'FINISH_REASON_LENGTH' | 'FINISH_REASON_ABORT';

export interface Usage {
  prompt_tokens: number;
  cached_prompt_tokens: number;
  image_tokens: number;
  thinking_tokens: number;
  answer_tokens: number;
}

export interface Timings {
  preprocess_ms: number;
  time_to_first_token_ms: number;
  total_ms: number;
  mean_inter_token_ms: number;
}

/** kimivl.v1.GenerationResult */
export interface GenerationResult {
  finish_reason: FinishReasonName;
  ended_in_thinking: boolean;
  thinking_budget_reached: boolean;
  usage: Usage | null;
  timings: Timings | null;
}

export interface DeltaEvent {
  thinking: string;
  answer: string;
  tokenIds: number[];
  result?: undefined;
}

export interface ResultEvent {
  result: GenerationResult;
}

export type ChatEvent = DeltaEvent | ResultEvent;

export interface ChatResult {
  thinking: string;
  answer: string;
  tokenIds: number[];
  finishReason: 'stop' | 'length' | 'abort' | 'unspecified';
  endedInThinking: boolean;
  thinkingBudgetReached: boolean;
  usage: Usage | null;
  timings: Timings | null;
  /** The GenerationResult as received. */
  result: GenerationResult;
}

/** kimivl.v1.ChatRequest as a plain object. */
export interface ChatRequest {
  conversation?: { messages: Array<{ role: string; content: Array<Record<string, unknown>> }> };
  raw_prompt?: { text: string; images: Array<Record<string, unknown>> };
  prepared_prompt?: Record<string, unknown>;
  sampling?: Record<string, unknown>;
  thinking?: { exclude_thinking?: boolean; max_thinking_tokens?: number };
  request_id?: string;
}

/** google.rpc.ErrorInfo: the stable reason (domain 'kimivl') and its metadata, e.g. {field, limit}. */
export interface ErrorInfo {
  reason: string;
  domain: string;
  metadata: Record<string, string>;
}

/** google.rpc.BadRequest.FieldViolation: the request field's path, e.g. 'conversation.messages[0].content[1].image'. */
export interface FieldViolation {
  field: string;
  description: string;
}

/** google.rpc.QuotaFailure.Violation: a size or count limit the request went over. */
export interface QuotaViolation {
  subject: string;
  description: string;
}

/** google.rpc.ResourceInfo: the limited resource, e.g. {resourceType: 'image', description: 'limit 8'}. */
export interface ResourceInfo {
  resourceType: string;
  resourceName: string;
  owner: string;
  description: string;
}

/** One google.rpc.Status detail, unpacked: its type URL and the message's .proto fields. */
export interface StatusDetail {
  '@type': string;
  [field: string]: unknown;
}

/** What a refusal's `grpc-status-details-bin` trailer says; null or empty where it has nothing. */
export interface ErrorDetails {
  /** ErrorInfo.reason: a stable code to branch on (docs/errors.md lists them). */
  reason: string | null;
  errorInfo: ErrorInfo | null;
  fieldViolations: FieldViolation[];
  quotaViolations: QuotaViolation[];
  /** The first ResourceInfo. */
  resourceInfo: ResourceInfo | null;
  /** RetryInfo.retry_delay in milliseconds: set where retrying helps (UNAVAILABLE, draining). */
  retryAfterMs: number | null;
  /** Every detail, unpacked; a type this client does not know keeps its bytes as `value`. */
  statusDetails: StatusDetail[];
}

export class KimiVLError extends Error implements ErrorDetails {
  /** The gRPC status number. */
  code: number;
  /** Its name, e.g. 'INVALID_ARGUMENT'. */
  codeName: string;
  /** The server's message. */
  details: string;
  /** The call's trailers. */
  metadata?: grpc.Metadata;
  reason: string | null;
  errorInfo: ErrorInfo | null;
  fieldViolations: FieldViolation[];
  quotaViolations: QuotaViolation[];
  resourceInfo: ResourceInfo | null;
  retryAfterMs: number | null;
  statusDetails: StatusDetail[];
  constructor(code: number, details: string, metadata?: grpc.Metadata);
  static from(err: unknown): KimiVLError;
  /** Plain data: {code (the name), message, reason, errorInfo, fieldViolations, quotaViolations, resourceInfo, retryAfterMs}. */
  toJSON(): Record<string, unknown>;
}

/** The details in `metadata`'s grpc-status-details-bin (empty when there is none or it does not decode). */
export function readErrorDetails(metadata?: grpc.Metadata | null): ErrorDetails;
/** A google.rpc.Status's bytes as {code, message, details}. */
export function decodeStatus(blob: Uint8Array): { code: number; message: string; details: StatusDetail[] };
export const STATUS_DETAILS_TRAILER: 'grpc-status-details-bin';

export class KimiVLClient {
  constructor(target?: string, options?: ClientOptions);
  readonly target: string;
  /** Streams `{thinking, answer, tokenIds}` events, then one `{result}`. Leaving the loop cancels the call. */
  stream(parts: Part | Part[], opts?: CallOptions): AsyncGenerator<ChatEvent, void, undefined>;
  /** The whole reply, collected. */
  chat(parts: Part | Part[], opts?: CallOptions): Promise<ChatResult>;
  /** PreprocessService.Preprocess for one user turn. */
  preprocess(parts: Part | Part[], opts?: RequestOptions & { deadlineMs?: number; metadata?: MetadataInit; dtype?: string }): Promise<any>;
  waitForReady(deadlineMs?: number): Promise<void>;
  close(): void;
}

export function buildRequest(parts: Part | Part[] | null | undefined, options?: RequestOptions): Promise<ChatRequest>;
export function contentPart(part: Part): Promise<Record<string, unknown>>;
export function samplingParameters(sampling?: Sampling | null): Record<string, unknown> | null;
export function loadProtos(protoDir?: string): any;
export function collect(events: ChatEvent[]): ChatResult;
export function toEvent(msg: any): ChatEvent;
export function toMetadata(...sources: Array<MetadataInit | undefined | null>): grpc.Metadata;
export const status: typeof grpc.status;
export { grpc };
export const SERVICE_CONFIG: Record<string, unknown>;
export const CHANNEL_OPTIONS: grpc.ChannelOptions;
export const LOADER_OPTIONS: Record<string, unknown>;
export const MAX_MESSAGE_BYTES: number;
export const DEFAULT_PROTO_DIR: string;
export const STATUS_NAMES: Record<number, string>;
