// Validation of /v1/completions and /v1/chat/completions bodies into what the engine needs. Every rejection is
// a 400 naming the parameter; fields we do not implement are refused when set to a non-default value rather
// than silently ignored, so a client never believes it got a behaviour it did not.
import { ApiError, badParam } from './errors.ts';

export interface SamplingParams {
  temperature: number;
  topP: number;
  topK: number;
  repetitionPenalty: number;
  seed?: number;
}

export interface CommonParams {
  model?: string;
  maxTokens?: number;
  sampling: SamplingParams;
  stop: string[];
  stream: boolean;
  includeUsage: boolean;
  /** Alternatives reported per sampled token; undefined: no logprobs; 0: only the sampled token's. */
  logprobs?: number;
}

export type PromptInput = { text: string } | { ids: number[] };

export interface CompletionParams extends CommonParams {
  prompt: PromptInput;
}

export interface ChatMessage {
  role: string;
  content: string;
  name?: string;
}

export interface ChatParams extends CommonParams {
  messages: ChatMessage[];
}

type Body = Record<string, unknown>;

const MAX_STOPS = 4;
const MAX_TOP_LOGPROBS = 20;

function isSet(v: unknown): boolean {
  return v !== undefined && v !== null;
}

function num(body: Body, key: string, dflt: number, ok: (v: number) => boolean, range: string): number {
  const v = body[key];
  if (!isSet(v)) return dflt;
  if (typeof v !== 'number' || !Number.isFinite(v)) throw badParam(key, `expected a number, got ${JSON.stringify(v)}`);
  if (!ok(v)) throw badParam(key, `${v} is out of range (${range})`);
  return v;
}

function int(body: Body, key: string, ok: (v: number) => boolean, range: string): number | undefined {
  const v = body[key];
  if (!isSet(v)) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v)) throw badParam(key, `expected an integer, got ${JSON.stringify(v)}`);
  if (!ok(v)) throw badParam(key, `${v} is out of range (${range})`);
  return v;
}

function bool(body: Body, key: string): boolean | undefined {
  const v = body[key];
  if (!isSet(v)) return undefined;
  if (typeof v !== 'boolean') throw badParam(key, `expected true or false, got ${JSON.stringify(v)}`);
  return v;
}

/** Fields whose only supported value is their default. */
function refuseUnless(body: Body, key: string, isDefault: (v: unknown) => boolean, why: string): void {
  const v = body[key];
  if (isSet(v) && !isDefault(v)) throw badParam(key, why, 'unsupported_value');
}

function common(body: Body, maxTokensKeys: string[]): CommonParams {
  const model = body.model;
  if (isSet(model) && typeof model !== 'string') throw badParam('model', `expected a string, got ${JSON.stringify(model)}`);
  const n = body.n;
  if (isSet(n) && n !== 1) {
    if (typeof n !== 'number' || !Number.isInteger(n) || n < 1) throw badParam('n', `expected a positive integer, got ${JSON.stringify(n)}`);
    throw badParam('n', `only n = 1 is supported (got ${n}); send ${n} requests instead, they are batched together`, 'unsupported_value');
  }
  let maxTokens: number | undefined;
  for (const key of maxTokensKeys) {
    const v = int(body, key, (x) => x >= 0, 'an integer ≥ 0');
    if (v !== undefined) maxTokens = v;
  }
  const sampling: SamplingParams = {
    temperature: num(body, 'temperature', 1, (v) => v >= 0 && v <= 2, '0 to 2'),
    topP: num(body, 'top_p', 1, (v) => v > 0 && v <= 1, 'greater than 0, at most 1'),
    // vLLM and llama.cpp use -1 (or 0) for "no top-k".
    topK: Math.max(0, int(body, 'top_k', (v) => v >= -1, 'an integer ≥ -1; -1 or 0: off') ?? 0),
    repetitionPenalty: num(body, 'repetition_penalty', 1, (v) => v > 0 && v <= 10, 'greater than 0, at most 10'),
    seed: int(body, 'seed', (v) => v >= 0 && v <= Number.MAX_SAFE_INTEGER, `an integer from 0 to ${Number.MAX_SAFE_INTEGER}`),
  };
  for (const key of ['presence_penalty', 'frequency_penalty']) {
    num(body, key, 0, (v) => v >= -2 && v <= 2, '-2 to 2');
    refuseUnless(body, key, (v) => v === 0, 'only 0 is supported; use repetition_penalty');
  }
  refuseUnless(body, 'logit_bias', (v) => typeof v === 'object' && Object.keys(v as object).length === 0, 'is not supported');
  const stream = bool(body, 'stream') ?? false;
  const so = body.stream_options;
  let includeUsage = false;
  if (isSet(so)) {
    if (!stream) throw badParam('stream_options', 'only allowed when stream is true');
    if (typeof so !== 'object' || Array.isArray(so)) throw badParam('stream_options', `expected an object, got ${JSON.stringify(so)}`);
    includeUsage = bool(so as Body, 'include_usage') ?? false;
  }
  return { model: model as string | undefined, maxTokens, sampling, stop: stops(body.stop), stream, includeUsage };
}

function stops(v: unknown): string[] {
  if (!isSet(v)) return [];
  const list = typeof v === 'string' ? [v] : v;
  if (!Array.isArray(list) || list.some((s) => typeof s !== 'string')) throw badParam('stop', `expected a string or an array of strings, got ${JSON.stringify(v)}`);
  if (list.length > MAX_STOPS) throw badParam('stop', `at most ${MAX_STOPS} stop sequences, got ${list.length}`);
  if (list.some((s) => s.length === 0)) throw badParam('stop', 'stop sequences must not be empty');
  return list as string[];
}

function asBody(v: unknown): Body {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new ApiError(400, 'the request body must be a JSON object', 'invalid_request_error', 'invalid_body');
  return v as Body;
}

export function parseCompletion(raw: unknown): CompletionParams {
  const body = asBody(raw);
  const c = common(body, ['max_tokens']);
  // OpenAI's default for /v1/completions.
  c.maxTokens ??= 16;
  const lp = int(body, 'logprobs', (v) => v >= 0 && v <= MAX_TOP_LOGPROBS, `0 to ${MAX_TOP_LOGPROBS}`);
  if (lp !== undefined) c.logprobs = lp;
  refuseUnless(body, 'echo', (v) => v === false, 'echo is not supported');
  refuseUnless(body, 'best_of', (v) => v === 1, 'only best_of = 1 is supported');
  refuseUnless(body, 'suffix', (v) => v === '', 'suffix (insertion) is not supported');
  return { ...c, prompt: prompt(body.prompt) };
}

function prompt(p: unknown): PromptInput {
  if (!isSet(p)) throw badParam('prompt', 'is required', 'missing_required_parameter');
  if (typeof p === 'string') return { text: p };
  if (Array.isArray(p)) {
    if (p.length === 0) throw badParam('prompt', 'must not be an empty array');
    if (p.every((x) => typeof x === 'number')) {
      if (!p.every((x) => Number.isInteger(x) && x >= 0)) throw badParam('prompt', 'token ids must be non-negative integers');
      return { ids: p as number[] };
    }
    if (p.length === 1) return prompt(p[0]);
    throw badParam('prompt', `only one prompt per request is supported (got ${p.length}); send one request per prompt`, 'unsupported_value');
  }
  throw badParam('prompt', `expected a string, an array with one string, or an array of token ids, got ${JSON.stringify(p)}`);
}

const ROLES = new Set(['system', 'developer', 'user', 'assistant', 'tool']);

export function parseChat(raw: unknown): ChatParams {
  const body = asBody(raw);
  const c = common(body, ['max_tokens', 'max_completion_tokens']);
  const wantLogprobs = bool(body, 'logprobs') ?? false;
  const top = int(body, 'top_logprobs', (v) => v >= 0 && v <= MAX_TOP_LOGPROBS, `0 to ${MAX_TOP_LOGPROBS}`);
  if (top !== undefined && !wantLogprobs) throw badParam('top_logprobs', 'needs logprobs: true');
  if (wantLogprobs) c.logprobs = top ?? 0;
  for (const key of ['tools', 'functions']) refuseUnless(body, key, (v) => Array.isArray(v) && v.length === 0, 'tool calling is not supported');
  const rf = body.response_format as Body | undefined;
  if (isSet(rf) && (typeof rf !== 'object' || rf.type !== 'text')) throw badParam('response_format', 'only {"type": "text"} is supported', 'unsupported_value');
  return { ...c, messages: messages(body.messages) };
}

function messages(m: unknown): ChatMessage[] {
  if (!isSet(m)) throw badParam('messages', 'is required', 'missing_required_parameter');
  if (!Array.isArray(m) || m.length === 0) throw badParam('messages', 'expected a non-empty array of messages');
  return m.map((msg, i) => {
    const where = `messages[${i}]`;
    if (typeof msg !== 'object' || msg === null || Array.isArray(msg)) throw badParam(where, 'expected an object with role and content');
    const { role, content, name } = msg as Body;
    if (typeof role !== 'string' || !ROLES.has(role)) throw badParam(`${where}.role`, `expected one of ${[...ROLES].join(', ')}, got ${JSON.stringify(role)}`);
    const out: ChatMessage = { role, content: messageText(content, `${where}.content`) };
    if (typeof name === 'string') out.name = name;
    return out;
  });
}

function messageText(content: unknown, where: string): string {
  if (content === null || content === undefined) return '';
  if (typeof content === 'string') return content;
  if (!Array.isArray(content)) throw badParam(where, `expected a string or an array of text parts, got ${JSON.stringify(content)}`);
  return content.map((part, j) => {
    const p = part as Body;
    if (typeof p !== 'object' || p === null || p.type !== 'text' || typeof p.text !== 'string') {
      throw badParam(`${where}[${j}]`, `only {"type": "text", "text": …} parts are supported, got type ${JSON.stringify(p?.type)}`, 'unsupported_value');
    }
    return p.text;
  }).join('');
}
