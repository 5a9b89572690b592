// The serving engine: continuous batching over one model. A single decode loop owns the model; every turn it
// admits waiting requests into free slots (prefill, first token), then advances every running sequence by one
// token in one batched step per adapter, then yields to the event loop so HTTP stays responsive. Each sequence
// has its own KV-cache session, taken from a pool and returned the moment it finishes or its client leaves.
// Sampling, stop strings and token budgets follow runtime/model/generate.ts, so a greedy request reproduces
// `qalora generate` token for token.
import type { InferenceSession, LlamaModel } from '../model/llama.ts';
import type { AdapterSet } from '../model/types.ts';
import { Sampler, StopStrings } from '../sampling.ts';
import { StreamDecoder, type Tokenizer } from '../tokenizer/types.ts';
import { ApiError } from './errors.ts';
import type { SamplingParams } from './params.ts';
import { topLogprobs, type TokenLogprob } from './logprobs.ts';

export type FinishReason = 'stop' | 'length' | 'cancelled';

export interface GenerationRequest {
  /** Token ids, BOS included. */
  prompt: number[];
  /** A loaded adapter's name, or null for the model as loaded. */
  adapter: string | null;
  maxTokens: number;
  sampling: SamplingParams;
  stop: string[];
  /** Alternatives per sampled token (0: the sampled token's logprob only); undefined: none. */
  logprobs?: number;
  /** Text as it becomes printable, with the logprobs of the tokens sampled since the last call. */
  onText?: (text: string, tokens: TokenLogprob[]) => void;
}

export interface GenerationResult {
  text: string;
  finishReason: FinishReason;
  promptTokens: number;
  completionTokens: number;
  tokens: TokenLogprob[];
}

export interface EngineOptions {
  /** Sequences decoded together (KV-cache slots). */
  parallel: number;
  /** Requests allowed to wait for a slot; beyond that, submit() answers 429. */
  maxQueue: number;
}

export interface EngineStats {
  queued: number;
  active: number;
  slots: number;
  /** Decode steps run, and those that advanced more than one sequence at once. */
  steps: number;
  batchedSteps: number;
  /** Σ sequences over decode steps, and the largest batch seen. */
  stepRows: number;
  maxBatch: number;
  prefillTokens: number;
  generatedTokens: number;
  cancelled: number;
  rejected: number;
  /** Generated tokens per second over the last few seconds. */
  tokensPerSecond: number;
}

interface Sequence {
  req: GenerationRequest;
  session?: InferenceSession;
  sampler: Sampler;
  history: number[];
  decoder: StreamDecoder;
  stops: StopStrings | null;
  limit: number;
  made: number;
  text: string;
  tokens: TokenLogprob[];
  pendingTokens: TokenLogprob[];
  /** The token to feed at the next decode step. */
  next: number;
  resolve: (r: GenerationResult) => void;
  reject: (e: unknown) => void;
}

export interface Submitted {
  result: Promise<GenerationResult>;
  /** Frees the request's slot (or its place in the queue) now; the result resolves with 'cancelled'. */
  cancel(): void;
}

const RATE_WINDOW_MS = 5000;

export class Engine {
  private readonly queue: Sequence[] = [];
  private readonly active: Sequence[] = [];
  private readonly pool: InferenceSession[] = [];
  private readonly adapterSets = new Map<string | null, AdapterSet>();
  private running = false;
  private accepting = true;
  private idleWaiters: Array<() => void> = [];
  private readonly recent: Array<[number, number]> = [];
  private meanRequestSeconds = 1;
  private readonly counters = { steps: 0, batchedSteps: 0, stepRows: 0, maxBatch: 0, prefillTokens: 0, generatedTokens: 0, cancelled: 0, rejected: 0 };

  constructor(
    readonly model: LlamaModel,
    readonly tokenizer: Tokenizer,
    adapters: Map<string, AdapterSet>,
    readonly opts: EngineOptions,
  ) {
    if (!(Number.isInteger(opts.parallel) && opts.parallel >= 1)) throw new Error(`parallel must be a positive integer, got ${opts.parallel}`);
    if (!(Number.isInteger(opts.maxQueue) && opts.maxQueue >= 0)) throw new Error(`maxQueue must be a non-negative integer, got ${opts.maxQueue}`);
    // The base runs with no adapter at all (not the zero-B adapters a fresh model carries: same output, less work).
    this.adapterSets.set(null, model.weights.blocks.map(() => ({})));
    for (const [name, set] of adapters) this.adapterSets.set(name, set);
  }

  get context(): number {
    return this.model.config.context;
  }

  stats(): EngineStats {
    const now = performance.now();
    this.trimRate(now);
    const made = this.recent.reduce((s, [, n]) => s + n, 0);
    const span = this.recent.length ? Math.max(1000, now - this.recent[0][0]) : RATE_WINDOW_MS;
    return { ...this.counters, queued: this.queue.length, active: this.active.length, slots: this.opts.parallel, tokensPerSecond: (made * 1000) / span };
  }

  /** Queues a request; throws ApiError 429 when the queue is full and 503 once shutting down. */
  submit(req: GenerationRequest): Submitted {
    if (!this.accepting) throw new ApiError(503, 'the server is shutting down', 'server_error', 'shutting_down');
    if (!this.adapterSets.has(req.adapter)) throw new ApiError(404, `no adapter named '${req.adapter}' is loaded`, 'invalid_request_error', 'model_not_found', 'model');
    const free = this.opts.parallel - this.active.length;
    if (this.queue.length - free >= this.opts.maxQueue) {
      this.counters.rejected++;
      const wait = Math.max(1, Math.ceil((this.meanRequestSeconds * (this.queue.length + 1)) / this.opts.parallel));
      throw new ApiError(429, `the server is busy: ${this.active.length} requests running and ${this.queue.length} waiting (--max-queue ${this.opts.maxQueue}); retry later`,
        'rate_limit_error', 'queue_full', null, { 'Retry-After': String(wait) });
    }
    const ctx = this.context, P = req.prompt.length;
    if (P === 0) throw new ApiError(400, 'the prompt has no tokens', 'invalid_request_error', 'invalid_value', 'prompt');
    if (P > ctx) throw new ApiError(400, `the prompt is ${P} tokens, more than the model's context of ${ctx}`, 'invalid_request_error', 'context_length_exceeded', 'prompt');
    let resolve!: (r: GenerationResult) => void, reject!: (e: unknown) => void;
    const result = new Promise<GenerationResult>((res, rej) => { resolve = res; reject = rej; });
    const seq: Sequence = {
      req,
      sampler: new Sampler(this.model.config.vocab, {
        temperature: req.sampling.temperature, topP: req.sampling.topP, topK: req.sampling.topK,
        repetitionPenalty: req.sampling.repetitionPenalty, seed: req.sampling.seed ?? randomSeed(),
      }),
      history: req.prompt.slice(),
      decoder: new StreamDecoder(this.tokenizer, req.prompt[P - 1]),
      stops: req.stop.length ? new StopStrings(req.stop) : null,
      // As generate(): prefill, then one step per further token, so at most ctx − P + 1 new tokens fit.
      limit: Math.min(req.maxTokens, ctx - P + 1),
      made: 0, text: '', tokens: [], pendingTokens: [], next: -1, resolve, reject,
    };
    const started = performance.now();
    result.then(() => {
      this.meanRequestSeconds = 0.8 * this.meanRequestSeconds + 0.2 * ((performance.now() - started) / 1000);
    }, () => {});
    this.queue.push(seq);
    this.wake();
    return { result, cancel: () => this.cancel(seq) };
  }

  /** Stops accepting; waits up to `deadlineMs` for running and queued requests, then cancels the rest. */
  async drain(deadlineMs: number): Promise<{ finished: boolean; cancelled: number }> {
    this.accepting = false;
    if (this.idle()) return { finished: true, cancelled: 0 };
    let timer: NodeJS.Timeout | undefined;
    const idle = new Promise<boolean>((res) => this.idleWaiters.push(() => res(true)));
    const late = new Promise<boolean>((res) => { timer = setTimeout(() => res(false), deadlineMs); });
    const finished = await Promise.race([idle, late]);
    clearTimeout(timer);
    if (finished) return { finished, cancelled: 0 };
    const left = [...this.queue, ...this.active];
    for (const seq of left) this.cancel(seq);
    return { finished, cancelled: left.length };
  }

  private idle(): boolean {
    return this.queue.length === 0 && this.active.length === 0;
  }

  private wake(): void {
    if (this.running) return;
    this.running = true;
    setImmediate(() => void this.loop());
  }

  private async loop(): Promise<void> {
    try {
      while (!this.idle()) {
        while (this.queue.length && this.active.length < this.opts.parallel) this.admit(this.queue.shift()!);
        this.decodeStep();
        // setImmediate runs after pending I/O: new requests, disconnects and writes are handled between steps.
        await new Promise<void>((res) => setImmediate(res));
      }
    } finally {
      this.running = false;
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      waiters.forEach((w) => w());
    }
  }

  private useAdapter(name: string | null): void {
    // The model's adapter set is what its next call reads (LlamaModel.adapters); one request's adapter at a time.
    this.model.adapters = this.adapterSets.get(name)!;
  }

  private admit(seq: Sequence): void {
    this.active.push(seq);
    if (seq.limit <= 0) return this.finish(seq, 'length');
    try {
      seq.session = this.pool.pop() ?? this.model.newSession();
      seq.session.reset();
      this.useAdapter(seq.req.adapter);
      const logits = seq.session.prefill(seq.req.prompt);
      this.counters.prefillTokens += seq.req.prompt.length;
      this.consume(seq, logits);
    } catch (e) {
      this.fail(seq, e);
    }
  }

  /** One token for every running sequence: one batched model step per adapter in use. */
  private decodeStep(): void {
    const groups = new Map<string | null, Sequence[]>();
    for (const seq of this.active) {
      const g = groups.get(seq.req.adapter);
      if (g) g.push(seq); else groups.set(seq.req.adapter, [seq]);
    }
    for (const [name, seqs] of groups) {
      this.useAdapter(name);
      let logits: Float32Array[];
      try {
        logits = this.model.stepBatch(seqs.map((s) => s.session!), seqs.map((s) => s.next));
      } catch (e) {
        seqs.forEach((s) => this.fail(s, e));
        continue;
      }
      this.counters.steps++;
      this.counters.stepRows += seqs.length;
      if (seqs.length > 1) this.counters.batchedSteps++;
      this.counters.maxBatch = Math.max(this.counters.maxBatch, seqs.length);
      seqs.forEach((s, i) => {
        try {
          this.consume(s, logits[i]);
        } catch (e) {
          this.fail(s, e);
        }
      });
    }
  }

  /** Samples the next token from `logits` and either finishes the sequence or leaves it ready for a step. */
  private consume(seq: Sequence, logits: Float32Array): void {
    const tok = this.tokenizer;
    const id = seq.sampler.sample(logits, seq.history);
    if (id === tok.bos || id === tok.eos) return this.finish(seq, 'stop');
    if (seq.req.logprobs !== undefined) {
      const lp = topLogprobs(logits, id, seq.req.logprobs, tok, seq.history[seq.history.length - 1]);
      seq.tokens.push(lp);
      seq.pendingTokens.push(lp);
    }
    seq.history.push(id);
    seq.made++;
    this.counters.generatedTokens++;
    this.noteRate(1);
    const piece = seq.decoder.push(id);
    if (seq.stops) {
      const r = seq.stops.push(piece);
      this.emit(seq, r.text);
      if (r.stop) return this.finish(seq, 'stop');
    } else {
      this.emit(seq, piece);
    }
    if (seq.made >= seq.limit) return this.finish(seq, 'length');
    seq.next = id;
  }

  private emit(seq: Sequence, text: string): void {
    if (!text && seq.pendingTokens.length === 0) return;
    seq.text += text;
    const tokens = seq.pendingTokens;
    seq.pendingTokens = [];
    try {
      seq.req.onText?.(text, tokens);
    } catch {
      // A consumer that cannot take text any more (its client is gone) must not stop the batch: drop it.
      this.cancel(seq);
    }
  }

  private finish(seq: Sequence, reason: FinishReason): void {
    if (!this.remove(seq)) return;
    if (reason !== 'cancelled') {
      let tail = seq.decoder.flush();
      if (seq.stops) tail = seq.stops.push(tail).text + seq.stops.flush();
      if (tail || seq.pendingTokens.length) this.emit(seq, tail);
    }
    seq.resolve({ text: seq.text, finishReason: reason, promptTokens: seq.req.prompt.length, completionTokens: seq.made, tokens: seq.tokens });
  }

  private fail(seq: Sequence, e: unknown): void {
    if (this.remove(seq)) seq.reject(e);
  }

  private cancel(seq: Sequence): void {
    if (this.active.includes(seq) || this.queue.includes(seq)) this.counters.cancelled++;
    this.finish(seq, 'cancelled');
  }

  /** Takes the sequence out of the queue or the batch and returns its session to the pool; false if already gone. */
  private remove(seq: Sequence): boolean {
    const q = this.queue.indexOf(seq);
    if (q >= 0) {
      this.queue.splice(q, 1);
      return true;
    }
    const a = this.active.indexOf(seq);
    if (a < 0) return false;
    this.active.splice(a, 1);
    if (seq.session) this.pool.push(seq.session);
    seq.session = undefined;
    return true;
  }

  private noteRate(n: number): void {
    const now = performance.now();
    const last = this.recent[this.recent.length - 1];
    if (last && now - last[0] < 100) last[1] += n;
    else this.recent.push([now, n]);
    this.trimRate(now);
  }

  private trimRate(now: number): void {
    while (this.recent.length && now - this.recent[0][0] > RATE_WINDOW_MS) this.recent.shift();
  }
}

function randomSeed(): number {
  return Math.floor(Math.random() * 2 ** 52) + 1;
}
