// Text generation as llama2.c's `run` does it: the prompt (BOS first) is fed, its pieces printed as they are
// consumed, then tokens are sampled until the position budget is spent or BOS/EOS comes. The prompt is
// prefilled in one batched pass rather than token by token; only the timing differs.
import { Sampler, type SamplingOptions } from '../sampling.ts';
import { StreamDecoder, type Tokenizer } from '../tokenizer/types.ts';
import { QaloraError } from '../errors.ts';
import type { LlamaModel } from './llama.ts';
import type { OpProfile } from './profile.ts';

export interface GenerateOptions extends SamplingOptions {
  prompt?: string;
  /** Positions in all, BOS and prompt included (llama2.c's -n); 0 or beyond the context: the context. */
  steps?: number;
  /** New tokens to generate (instead of steps). */
  maxTokens?: number;
  /** Called with each printable piece as soon as it is known. */
  onText?: (text: string) => void;
  /** Times each decoded token's forward as one profile step (the model must have been created with it). */
  profile?: OpProfile;
}

export interface GenerateResult {
  text: string;
  promptTokens: number;
  newTokens: number;
  prefillSeconds: number;
  decodeSeconds: number;
}

export function generate(model: LlamaModel, tok: Tokenizer, o: GenerateOptions): GenerateResult {
  const ctx = model.config.context;
  const prompt = tok.encode(o.prompt ?? '', { bos: true });
  if (prompt.length === 0) throw new QaloraError('the prompt encodes to no tokens');
  if (prompt.length > ctx) throw new QaloraError(`the prompt is ${prompt.length} tokens, more than the model's context of ${ctx}`);
  // llama2.c forwards `steps` positions and samples at each one from the prompt's last: steps − P + 1 new tokens.
  let shown = prompt.length, newLimit: number;
  if (o.maxTokens !== undefined) {
    if (!Number.isInteger(o.maxTokens) || o.maxTokens < 0) throw new QaloraError(`max tokens must be a non-negative integer, got ${o.maxTokens}`);
    newLimit = Math.min(o.maxTokens, ctx - prompt.length + 1);
  } else {
    let steps = o.steps ?? 256;
    if (!Number.isInteger(steps) || steps < 0) throw new QaloraError(`-n must be a non-negative integer, got ${o.steps}`);
    if (steps === 0 || steps > ctx) steps = ctx;
    shown = Math.min(prompt.length, steps);
    newLimit = Math.max(0, steps - prompt.length + 1);
  }
  const sampler = new Sampler(model.config.vocab, o);
  const decoder = new StreamDecoder(tok, prompt[0]);
  let text = '';
  const emit = (id: number) => {
    const piece = decoder.push(id);
    if (!piece) return;
    text += piece;
    o.onText?.(piece);
  };
  // llama2.c prints the prompt's pieces (after BOS) as it consumes them.
  for (let i = 1; i < shown; i++) emit(prompt[i]);
  const history = prompt.slice();
  const session = model.newSession();
  const t0 = performance.now();
  let logits = newLimit > 0 ? session.prefill(prompt) : undefined;
  const t1 = performance.now();
  let made = 0;
  while (logits && made < newLimit) {
    const next = sampler.sample(logits, history);
    if (next === tok.bos || next === tok.eos) break;
    emit(next);
    history.push(next);
    made++;
    if (made < newLimit) {
      o.profile?.beginStep();
      logits = session.step(next);
      o.profile?.endStep();
    }
  }
  const tail = decoder.flush();
  if (tail) {
    text += tail;
    o.onText?.(tail);
  }
  const t2 = performance.now();
  return { text, promptTokens: prompt.length, newTokens: made, prefillSeconds: (t1 - t0) / 1000, decodeSeconds: (t2 - t1) / 1000 };
}
