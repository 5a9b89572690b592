// The generation endpoints in OpenAI's wire format: /v1/completions and /v1/chat/completions, whole or as
// server-sent events. Both share one path (validate → pick the model → tokenize → engine → write); they differ
// only in how a piece of text, a finish and the logprobs are wrapped, which `Shape` describes.
import { randomUUID } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Tokenizer } from '../tokenizer/types.ts';
import type { ChatTemplate } from './chat-template.ts';
import { encodeChat } from './chat-template.ts';
import type { Engine, FinishReason, GenerationResult } from './engine.ts';
import { ApiError, badParam } from './errors.ts';
import type { TokenLogprob } from './logprobs.ts';
import type { Metrics } from './metrics.ts';
import { parseChat, parseCompletion, type CommonParams } from './params.ts';

export interface GenerationContext {
  engine: Engine;
  tokenizer: Tokenizer;
  chatTemplate: ChatTemplate;
  metrics: Metrics;
  /** The name the model as loaded answers to; adapters answer to theirs. */
  baseName: string;
  adapterNames: string[];
}

interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

/** How one endpoint wraps its payloads. */
interface Shape {
  object: string;
  chunkObject: string;
  idPrefix: string;
  /** The first streamed choice (chat announces the role). */
  opening?: () => Record<string, unknown>;
  delta(text: string): Record<string, unknown>;
  /** The choice of the last streamed chunk, beside finish_reason. */
  closing: Record<string, unknown>;
  whole(text: string): Record<string, unknown>;
  logprobs(tokens: TokenLogprob[], offset: number): unknown;
}

const completionShape: Shape = {
  object: 'text_completion',
  chunkObject: 'text_completion',
  idPrefix: 'cmpl-',
  delta: (text) => ({ text }),
  closing: { text: '' },
  whole: (text) => ({ text }),
  logprobs(tokens, offset) {
    const text_offset: number[] = [];
    for (const t of tokens) {
      text_offset.push(offset);
      offset += t.token.length;
    }
    return {
      tokens: tokens.map((t) => t.token),
      token_logprobs: tokens.map((t) => t.logprob),
      top_logprobs: tokens.map((t) => Object.fromEntries(t.top.map((a) => [a.token, a.logprob]))),
      text_offset,
    };
  },
};

const chatShape: Shape = {
  object: 'chat.completion',
  chunkObject: 'chat.completion.chunk',
  idPrefix: 'chatcmpl-',
  opening: () => ({ delta: { role: 'assistant', content: '' } }),
  delta: (text) => ({ delta: { content: text } }),
  closing: { delta: {} },
  whole: (text) => ({ message: { role: 'assistant', content: text, refusal: null } }),
  logprobs: (tokens) => ({
    content: tokens.map((t) => ({
      token: t.token, logprob: t.logprob, bytes: t.bytes,
      top_logprobs: t.top.map((a) => ({ token: a.token, logprob: a.logprob, bytes: a.bytes })),
    })),
    refusal: null,
  }),
};

/** The adapter a request's `model` names: null for the base (or when no model is given). */
function pickModel(ctx: GenerationContext, model: string | undefined): string | null {
  if (model === undefined || model === ctx.baseName) return null;
  if (ctx.adapterNames.includes(model)) return model;
  const known = [ctx.baseName, ...ctx.adapterNames].map((n) => `'${n}'`).join(', ');
  throw new ApiError(404, `The model '${model}' does not exist; this server has ${known}`, 'invalid_request_error', 'model_not_found', 'model');
}

export async function completions(ctx: GenerationContext, body: unknown, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const p = parseCompletion(body);
  const adapter = pickModel(ctx, p.model);
  let ids: number[];
  if ('text' in p.prompt) {
    ids = ctx.tokenizer.encode(p.prompt.text, { bos: true });
  } else {
    const vocab = ctx.engine.model.config.vocab;
    const bad = p.prompt.ids.findIndex((id) => id >= vocab);
    if (bad >= 0) throw badParam('prompt', `token id ${p.prompt.ids[bad]} at index ${bad} is outside the vocabulary [0, ${vocab})`);
    ids = p.prompt.ids;
  }
  checkContext(ctx, ids.length, 'prompt');
  await run(ctx, completionShape, p, ids, adapter, req, res);
}

export async function chatCompletions(ctx: GenerationContext, body: unknown, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const p = parseChat(body);
  const adapter = pickModel(ctx, p.model);
  const ids = encodeChat(ctx.chatTemplate.render(p.messages), ctx.chatTemplate, ctx.tokenizer);
  checkContext(ctx, ids.length, 'messages');
  // Chat has no OpenAI default; generate until EOS or the context is full.
  p.maxTokens ??= ctx.engine.context;
  await run(ctx, chatShape, p, ids, adapter, req, res);
}

function checkContext(ctx: GenerationContext, n: number, param: string): void {
  const c = ctx.engine.context;
  if (n > c) {
    throw new ApiError(400, `This model's maximum context length is ${c} tokens, but the ${param} is ${n} tokens; shorten it`,
      'invalid_request_error', 'context_length_exceeded', param);
  }
}

function usage(r: GenerationResult): Usage {
  return { prompt_tokens: r.promptTokens, completion_tokens: r.completionTokens, total_tokens: r.promptTokens + r.completionTokens };
}

const cancelledByShutdown = () =>
  new ApiError(503, 'the server shut down before this request finished', 'server_error', 'shutting_down');

async function run(ctx: GenerationContext, shape: Shape, p: CommonParams, prompt: number[], adapter: string | null, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const id = shape.idPrefix + randomUUID().replaceAll('-', '').slice(0, 24);
  const created = Math.floor(Date.now() / 1000);
  const model = adapter ?? ctx.baseName;
  const head = { id, object: shape.chunkObject, created, model, system_fingerprint: 'qalora' };
  const wantLogprobs = p.logprobs !== undefined;
  let offset = 0;
  const write = (data: unknown) => {
    if (!res.writableEnded && !res.destroyed) res.write(`data: ${JSON.stringify(data)}\n\n`);
  };
  const chunk = (choice: Record<string, unknown>) => write({ ...head, choices: [{ index: 0, ...choice }], ...(p.includeUsage ? { usage: null } : {}) });

  const handle = ctx.engine.submit({
    prompt, adapter, maxTokens: p.maxTokens!, sampling: p.sampling, stop: p.stop, logprobs: p.logprobs,
    onText: p.stream ? (text, tokens) => {
      const lp = wantLogprobs ? shape.logprobs(tokens, offset) : null;
      offset += text.length;
      chunk({ ...shape.delta(text), logprobs: lp, finish_reason: null });
    } : undefined,
  });
  // A client that goes away frees its slot now, not when its sequence would have ended.
  res.on('close', () => {
    if (!res.writableFinished) handle.cancel();
  });
  if (p.stream) {
    res.writeHead(200, { 'Content-Type': 'text/event-stream; charset=utf-8', 'Cache-Control': 'no-cache', 'X-Accel-Buffering': 'no' });
    res.flushHeaders();
    if (shape.opening) chunk({ ...shape.opening(), logprobs: null, finish_reason: null });
  }
  let r: GenerationResult;
  try {
    r = await handle.result;
  } catch (e) {
    if (!p.stream) throw e;
    write(internalError(e).body());
    if (!res.destroyed) res.end('data: [DONE]\n\n');
    return;
  }
  if (r.finishReason !== 'cancelled') ctx.metrics.tokens(r.promptTokens, r.completionTokens);
  if (!p.stream) {
    if (r.finishReason === 'cancelled') {
      if (res.destroyed) return;
      throw cancelledByShutdown();
    }
    const body = {
      ...head, object: shape.object,
      choices: [{ index: 0, ...shape.whole(r.text), logprobs: wantLogprobs ? shape.logprobs(r.tokens, 0) : null, finish_reason: r.finishReason }],
      usage: usage(r),
    };
    sendJson(res, 200, body);
    return;
  }
  if (res.destroyed) return;
  if (r.finishReason === 'cancelled') {
    write(cancelledByShutdown().body());
  } else {
    chunk({ ...shape.closing, logprobs: null, finish_reason: r.finishReason as Exclude<FinishReason, 'cancelled'> });
    if (p.includeUsage) write({ ...head, choices: [], usage: usage(r) });
  }
  res.end('data: [DONE]\n\n');
}

/** What an unexpected failure looks like to the client (the details go to the server's log). */
export function internalError(e: unknown): ApiError {
  if (e instanceof ApiError) return e;
  const userFacing = (e as { userFacing?: boolean })?.userFacing;
  if (userFacing) return new ApiError(400, (e as Error).message, 'invalid_request_error', 'invalid_value');
  process.stderr.write(`qalora serve: internal error: ${(e as Error)?.stack ?? e}\n`);
  return new ApiError(500, 'internal server error', 'server_error', 'internal_error');
}

export function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  if (res.headersSent) return void res.end();
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json; charset=utf-8', 'Content-Length': Buffer.byteLength(text), ...headers });
  res.end(text);
}
