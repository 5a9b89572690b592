// `qalora serve` through the official openai client (v6) against servers on 127.0.0.1:0 over stories260K:
// completions and chat, whole and streamed, equal to `qalora generate`'s own generate() for the same prompt and
// sampling; concurrent streams batched into shared decode steps; a client leaving mid-stream; each error class;
// the API key. The reference generations run on a separately loaded model, not the server's.
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openModel } from '../runtime/model/open.ts';
import { generate, type GenerateOptions } from '../runtime/model/generate.ts';
import type { LlamaModel } from '../runtime/model/llama.ts';
import type { Tokenizer } from '../runtime/tokenizer/types.ts';
import { Engine } from '../runtime/serve/engine.ts';
import { createQaloraServer } from '../runtime/serve/load.ts';
import { sample } from '../runtime/serve/metrics.ts';
import { QaloraServer } from '../runtime/serve/server.ts';
import { fixture, needs } from './fixtures.ts';

const MODEL = 'models/stories260K/stories260K.bin';
const M = 'stories260K';
const TOK = 'models/stories260K/tok512.bin';
const GOLDEN = 'golden/stories260K_prompt_once_n64.txt';

let server: QaloraServer;
let url: string;
let client: OpenAI;
let ref: { model: LlamaModel; tokenizer: Tokenizer };
const extra: QaloraServer[] = [];

/** The continuation generate() prints after the prompt (it echoes the prompt's pieces first, llama2.c style). */
function reference(prompt: string, o: GenerateOptions): string {
  const r = generate(ref.model, ref.tokenizer, { prompt, ...o });
  expect(r.text.startsWith(prompt)).toBe(true);
  return r.text.slice(prompt.length);
}

async function metrics(base = url): Promise<string> {
  return (await fetch(`${base}/metrics`)).text();
}

async function metric(series: string, base = url): Promise<number> {
  const v = sample(await metrics(base), series);
  if (v === undefined) throw new Error(`no ${series} in /metrics`);
  return v;
}

/** Another server over the same model, with its own engine and options. */
async function sideServer(opts: { parallel?: number; maxQueue?: number; apiKey?: string; maxBodyBytes?: number }): Promise<string> {
  const main = server.opts;
  const engine = new Engine(main.engine.model, main.tokenizer, new Map(), { parallel: opts.parallel ?? 2, maxQueue: opts.maxQueue ?? 4 });
  const s = new QaloraServer({ ...main, engine, apiKey: opts.apiKey, maxBodyBytes: opts.maxBodyBytes });
  extra.push(s);
  const a = await s.listen(0);
  return `http://127.0.0.1:${a.port}`;
}

async function post(base: string, path: string, body: string | object, headers: Record<string, string> = {}): Promise<{ status: number; json: any; headers: Headers }> {
  const r = await fetch(base + path, {
    method: 'POST', headers: { 'content-type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
  return { status: r.status, json: await r.json(), headers: r.headers };
}

beforeAll(async () => {
  server = await createQaloraServer({ model: fixture(MODEL), tokenizer: fixture(TOK), parallel: 8, maxQueue: 16 });
  const a = await server.listen(0);
  url = `http://127.0.0.1:${a.port}`;
  client = new OpenAI({ baseURL: `${url}/v1`, apiKey: 'unused', maxRetries: 0 });
  ref = await openModel({ model: fixture(MODEL), tokenizer: fixture(TOK) });
});

afterAll(async () => {
  for (const s of [server, ...extra]) await s?.shutdown(1000);
});

describe('qalora serve: generation', () => {
  it('lists the model and answers /health without a key', async () => {
    const models = await client.models.list();
    expect(models.data.map((m) => m.id)).toEqual(['stories260K']);
    expect((await client.models.retrieve('stories260K')).id).toBe('stories260K');
    const h = await fetch(`${url}/health`);
    expect(h.status).toBe(200);
    expect((await h.json()).status).toBe('ok');
  });

  it('/metrics counts requests, tokens and latency in Prometheus text', async () => {
    const p0 = await metric('qalora_prompt_tokens_total'), c0 = await metric('qalora_completion_tokens_total');
    const n0 = sample(await metrics(), 'qalora_request_duration_seconds_count{route="/v1/completions"}') ?? 0;
    const r = await client.completions.create({ model: M, prompt: 'Once upon a time', max_tokens: 7, temperature: 0 });
    const text = await metrics();
    expect(sample(text, 'qalora_prompt_tokens_total')! - p0).toBe(r.usage!.prompt_tokens);
    expect(sample(text, 'qalora_completion_tokens_total')! - c0).toBe(7);
    expect(sample(text, 'qalora_request_duration_seconds_count{route="/v1/completions"}')).toBe(n0 + 1);
    expect(sample(text, 'qalora_request_duration_seconds_bucket{route="/v1/completions",le="+Inf"}')).toBe(n0 + 1);
    expect(sample(text, 'qalora_requests_total{route="/v1/completions",method="POST",status="200"}')).toBeGreaterThanOrEqual(1);
    for (const name of ['qalora_queue_depth', 'qalora_tokens_per_second', 'qalora_active_sequences']) expect(text).toMatch(new RegExp(`^# TYPE ${name} gauge$`, 'm'));
    expect(sample(text, 'qalora_tokens_per_second')).toBeGreaterThan(0);
  });

  it('a greedy completion equals generate() and llama2.c for the same prompt', needs(GOLDEN), async () => {
    const prompt = 'Once upon a time';
    const r = await client.completions.create({ model: 'stories260K', prompt, max_tokens: 60, temperature: 0 });
    const text = r.choices[0].text;
    expect(text).toBe(reference(prompt, { temperature: 0, maxTokens: 60 }));
    // llama2.c's `run -n 64 -i "Once upon a time"`: 5 prompt positions (BOS included) + 59 steps = 60 new tokens.
    expect(prompt + text + '\n').toBe((await import('node:fs')).readFileSync(fixture(GOLDEN), 'utf8'));
    expect(r.choices[0].finish_reason).toBe('length');
    expect(r.usage).toEqual({ prompt_tokens: 5, completion_tokens: 60, total_tokens: 65 });
    expect(r.object).toBe('text_completion');
  });

  it('streams a completion token by token with usage at the end', async () => {
    const prompt = 'The little dog';
    const stream = await client.completions.create({ model: M, prompt, max_tokens: 40, temperature: 0, stream: true, stream_options: { include_usage: true } });
    const pieces: string[] = [];
    let finish: string | null = null, usage: OpenAI.CompletionUsage | undefined | null;
    for await (const c of stream) {
      if (c.choices.length) {
        pieces.push(c.choices[0].text);
        finish = c.choices[0].finish_reason ?? finish;
      } else {
        usage = c.usage;
      }
    }
    expect(pieces.filter((p) => p).length).toBeGreaterThan(10);
    expect(pieces.join('')).toBe(reference(prompt, { temperature: 0, maxTokens: 40 }));
    expect(finish).toBe('length');
    expect(usage?.completion_tokens).toBe(40);
    expect(usage?.prompt_tokens).toBe(ref.tokenizer.encode(prompt, { bos: true }).length);
  });

  it('chat, whole and streamed, runs the plain template (one user message = the prompt)', async () => {
    const messages = [{ role: 'user' as const, content: 'Lily and Ben went to the park' }];
    const expected = reference(messages[0].content, { temperature: 0, maxTokens: 30 });
    const whole = await client.chat.completions.create({ model: 'stories260K', messages, max_tokens: 30, temperature: 0 });
    expect(whole.choices[0].message).toMatchObject({ role: 'assistant', content: expected });
    expect(whole.object).toBe('chat.completion');
    const stream = await client.chat.completions.create({ model: M, messages, max_completion_tokens: 30, temperature: 0, stream: true });
    const deltas: string[] = [];
    let role: string | undefined;
    for await (const c of stream) {
      role ??= c.choices[0]?.delta.role;
      deltas.push(c.choices[0]?.delta.content ?? '');
    }
    expect(role).toBe('assistant');
    expect(deltas.join('')).toBe(expected);
    // Two messages are joined by a newline.
    const two = await client.chat.completions.create({ model: M, messages: [{ role: 'system', content: 'Once upon a time' }, { role: 'user', content: 'there was a cat' }], max_tokens: 20, temperature: 0 });
    expect(two.choices[0].message.content).toBe(reference('Once upon a time\nthere was a cat', { temperature: 0, maxTokens: 20 }));
  });

  it('seeded sampling (temperature, top_p, top_k) reproduces generate() with the same seed', async () => {
    const prompt = 'One day';
    for (const o of [{ temperature: 1, top_p: 1, seed: 42 }, { temperature: 0.8, top_p: 0.9, seed: 7 }, { temperature: 1.2, top_k: 20, seed: 3 }] as const) {
      const r = await client.completions.create({ model: M, prompt, max_tokens: 40, ...o } as OpenAI.CompletionCreateParamsNonStreaming);
      const topK = 'top_k' in o ? o.top_k : 0;
      const topP = 'top_p' in o ? o.top_p : 1;
      expect(r.choices[0].text).toBe(reference(prompt, { temperature: o.temperature, topP, topK, seed: o.seed, maxTokens: 40 }));
    }
  });

  it('stop strings end the text before them', async () => {
    const prompt = 'Once upon a time';
    const full = reference(prompt, { temperature: 0, maxTokens: 60 });
    const at = full.indexOf('Lily');
    expect(at).toBeGreaterThan(0);
    const r = await client.completions.create({ model: M, prompt, max_tokens: 60, temperature: 0, stop: ['Lily', 'zzz'] });
    expect(r.choices[0].text).toBe(full.slice(0, at));
    expect(r.choices[0].finish_reason).toBe('stop');
    const s = await client.completions.create({ model: M, prompt, max_tokens: 60, temperature: 0, stop: 'Lily', stream: true });
    let text = '';
    for await (const c of s) text += c.choices[0]?.text ?? '';
    expect(text).toBe(full.slice(0, at));
  });

  it('logprobs are the model\'s log-softmax for the sampled token and its top alternatives', async () => {
    const prompt = 'Once upon a time';
    const r = await client.completions.create({ model: M, prompt, max_tokens: 3, temperature: 0, logprobs: 3 });
    const lp = r.choices[0].logprobs!;
    expect(lp.tokens!.length).toBe(3);
    // Independent float64 log-softmax of the reference model's logits after the prompt.
    const session = ref.model.newSession();
    const logits = Array.from(session.prefill(ref.tokenizer.encode(prompt, { bos: true })));
    const max = Math.max(...logits);
    const lse = max + Math.log(logits.reduce((s, x) => s + Math.exp(x - max), 0));
    const order = logits.map((x, i) => [x, i]).sort((a, b) => b[0] - a[0]);
    expect(lp.token_logprobs![0]).toBeCloseTo(order[0][0] - lse, 5);
    const tops = Object.values(lp.top_logprobs![0]);
    expect(tops.length).toBe(3);
    tops.forEach((v, k) => expect(v).toBeCloseTo(order[k][0] - lse, 5));
    expect(lp.tokens![0]).toBe(ref.tokenizer.decodeToken(378, order[0][1]));
    // The README's figures: "," then " there" after "Once upon a time".
    expect(Object.keys(lp.top_logprobs![0]).slice(0, 2)).toEqual([',', ' there']);
    const chat = await client.chat.completions.create({ model: M, messages: [{ role: 'user', content: prompt }], max_tokens: 2, temperature: 0, logprobs: true, top_logprobs: 2 });
    const c0 = chat.choices[0].logprobs!.content![0];
    expect(c0.token).toBe(',');
    expect(c0.logprob).toBeCloseTo(order[0][0] - lse, 5);
    expect(c0.top_logprobs.map((t) => t.token)).toEqual([',', ' there']);
  });
});

describe('qalora serve: continuous batching', () => {
  const prompts = ['Once upon a time', 'The cat', 'Lily was', 'One day, Tom', 'The sun', 'Ben had a', 'In the park', 'A big red'];

  it(`${prompts.length} concurrent streams match their own generations and share decode steps`, async () => {
    const maxTokens = 48;
    const expected = prompts.map((p) => reference(p, { temperature: 0, maxTokens }));
    const stream = async (prompt: string) => {
      const s = await client.completions.create({ model: M, prompt, max_tokens: maxTokens, temperature: 0, stream: true });
      let text = '';
      for await (const c of s) text += c.choices[0]?.text ?? '';
      return text;
    };
    const counters = async () => ({
      steps: await metric('qalora_decode_steps_total'), batched: await metric('qalora_decode_batched_steps_total'),
      rows: await metric('qalora_decode_step_rows_total'),
    });

    const s0 = await counters();
    let t = performance.now();
    const sequential: string[] = [];
    for (const p of prompts) sequential.push(await stream(p));
    const seqMs = performance.now() - t;
    const s1 = await counters();
    t = performance.now();
    const concurrent = await Promise.all(prompts.map(stream));
    const conMs = performance.now() - t;
    const s2 = await counters();

    expect(sequential).toEqual(expected);
    expect(concurrent).toEqual(expected);
    const seqSteps = s1.steps - s0.steps, conSteps = s2.steps - s1.steps, rows = s2.rows - s1.rows;
    expect(s1.batched - s0.batched).toBe(0);
    expect(seqSteps).toBe(s1.rows - s0.rows);
    // Batching happened: the same tokens took far fewer model steps, several sequences per step.
    expect(rows).toBe(seqSteps);
    expect(s2.batched - s1.batched).toBeGreaterThan(0);
    expect(conSteps).toBeLessThan(seqSteps / 2);
    expect(await metric('qalora_decode_max_batch')).toBeGreaterThanOrEqual(4);
    console.log(`serve: ${prompts.length} streams × ${maxTokens} tokens: sequential ${seqMs.toFixed(0)} ms in ${seqSteps} decode steps, ` +
      `concurrent ${conMs.toFixed(0)} ms in ${conSteps} steps (${(rows / conSteps).toFixed(2)} sequences per step)`);
  });

  it('a client that disconnects mid-stream frees its slot at once', async () => {
    const cancelled0 = await metric('qalora_cancelled_requests_total');
    const made0 = await metric('qalora_generated_tokens_total');
    const stream = await client.completions.create({ model: M, prompt: 'Once upon a time', max_tokens: 500, temperature: 0, stream: true });
    let chunks = 0;
    for await (const c of stream) {
      if (c.choices[0]?.text) chunks++;
      if (chunks === 3) break; // leaving the loop aborts the request
    }
    let active = -1;
    for (let i = 0; i < 100 && active !== 0; i++) {
      await new Promise((r) => setTimeout(r, 20));
      active = await metric('qalora_active_sequences');
    }
    expect(active).toBe(0);
    expect(await metric('qalora_cancelled_requests_total')).toBe(cancelled0 + 1);
    expect(await metric('qalora_generated_tokens_total') - made0).toBeLessThan(100);
    const health = await (await fetch(`${url}/health`)).json();
    expect(health).toMatchObject({ status: 'ok', active: 0, queued: 0 });
  });

  it('a full queue answers 429 with Retry-After, and the queue drains', async () => {
    const base = await sideServer({ parallel: 1, maxQueue: 1 });
    const c = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'x', maxRetries: 0 });
    const first = await c.completions.create({ model: M, prompt: 'Once', max_tokens: 200, temperature: 0, stream: true });
    const it1 = first[Symbol.asyncIterator]();
    await it1.next(); // running: holds the only slot
    const second = c.completions.create({ model: M, prompt: 'The cat', max_tokens: 5, temperature: 0 }); // waits in the queue
    await new Promise((r) => setTimeout(r, 50));
    expect(await metric('qalora_queue_depth', base)).toBe(1);
    const third = await post(base, '/v1/completions', { prompt: 'Lily', max_tokens: 5 });
    expect(third.status).toBe(429);
    expect(third.json.error).toMatchObject({ type: 'rate_limit_error', code: 'queue_full' });
    expect(Number(third.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
    await expect(c.completions.create({ model: M, prompt: 'Lily', max_tokens: 5 })).rejects.toBeInstanceOf(OpenAI.RateLimitError);
    while (!(await it1.next()).done);
    expect((await second).choices[0].text).toBe(reference('The cat', { temperature: 0, maxTokens: 5 }));
    expect(await metric('qalora_rejected_requests_total', base)).toBe(2);
  });
  it('shutdown stops accepting and cancels what is still running at the deadline', async () => {
    const base = await sideServer({ parallel: 2, maxQueue: 2 });
    const s = extra[extra.length - 1];
    const c = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'x', maxRetries: 0 });
    const stream = await c.completions.create({ model: M, prompt: 'Once', max_tokens: 500, temperature: 0, stream: true });
    const iter = stream[Symbol.asyncIterator]();
    await iter.next();
    const whole = c.completions.create({ model: M, prompt: 'Once', max_tokens: 500, temperature: 0 }).catch((e) => e);
    for (let i = 0; i < 200 && (await metric('qalora_active_sequences', base)) < 2; i++) await new Promise((r) => setTimeout(r, 5));
    const stopped = s.shutdown(50);
    const rest = (async () => {
      try {
        while (!(await iter.next()).done);
        return 'ended';
      } catch (e) {
        return e;
      }
    })();
    expect(await stopped).toEqual({ finished: false, cancelled: 2 });
    const streamEnd = await rest;
    expect(streamEnd).toBeInstanceOf(OpenAI.APIError);
    expect(String((streamEnd as Error).message)).toMatch(/shut down/);
    const w = await whole;
    expect(w).toBeInstanceOf(OpenAI.APIError);
    expect(w.status).toBe(503);
    await expect(fetch(`${base}/health`)).rejects.toThrow();
  });
});

describe('qalora serve: errors and the API key', () => {
  it('each error class has OpenAI\'s shape and status', async () => {
    const shape = (j: any) => expect(Object.keys(j.error).sort()).toEqual(['code', 'message', 'param', 'type']);

    const bad = await post(url, '/v1/completions', '{"prompt": "x",');
    expect(bad.status).toBe(400);
    expect(bad.json.error.code).toBe('invalid_json');
    shape(bad.json);

    const unknown = await client.completions.create({ model: 'gpt-4', prompt: 'x' }).catch((e) => e);
    expect(unknown).toBeInstanceOf(OpenAI.NotFoundError);
    expect(unknown.code).toBe('model_not_found');
    expect(unknown.message).toMatch(/gpt-4.*does not exist/);

    const long = 'Once upon a time there was a dog. '.repeat(80);
    expect(ref.tokenizer.encode(long, { bos: true }).length).toBeGreaterThan(512);
    const tooLong = await client.completions.create({ model: M, prompt: long }).catch((e) => e);
    expect(tooLong).toBeInstanceOf(OpenAI.BadRequestError);
    expect(tooLong.code).toBe('context_length_exceeded');
    const chatLong = await post(url, '/v1/chat/completions', { messages: [{ role: 'user', content: long }] });
    expect(chatLong.status).toBe(400);
    expect(chatLong.json.error).toMatchObject({ code: 'context_length_exceeded', param: 'messages' });

    const invalid: Array<[object, string]> = [
      [{ prompt: 'x', temperature: 5 }, 'temperature'],
      [{ prompt: 'x', temperature: 'hot' }, 'temperature'],
      [{ prompt: 'x', top_p: 0 }, 'top_p'],
      [{ prompt: 'x', top_k: 2.5 }, 'top_k'],
      [{ prompt: 'x', max_tokens: -1 }, 'max_tokens'],
      [{ prompt: 'x', seed: -3 }, 'seed'],
      [{ prompt: 'x', n: 2 }, 'n'],
      [{ prompt: 'x', stop: ['a', 'b', 'c', 'd', 'e'] }, 'stop'],
      [{ prompt: 'x', stop: [''] }, 'stop'],
      [{ prompt: 'x', logprobs: 50 }, 'logprobs'],
      [{ prompt: 'x', stream_options: { include_usage: true } }, 'stream_options'],
      [{ prompt: ['a', 'b'] }, 'prompt'],
      [{ prompt: [1, 99999] }, 'prompt'],
      [{ max_tokens: 3 }, 'prompt'],
      [{ prompt: 'x', frequency_penalty: 1 }, 'frequency_penalty'],
    ];
    for (const [body, param] of invalid) {
      const r = await post(url, '/v1/completions', body);
      expect(r.status, JSON.stringify(body)).toBe(400);
      expect(r.json.error.param).toBe(param);
      expect(r.json.error.message).toContain(param);
      shape(r.json);
    }
    const chatBad: Array<[object, string]> = [
      [{ messages: [] }, 'messages'],
      [{ messages: [{ role: 'wizard', content: 'x' }] }, 'messages[0].role'],
      [{ messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'x' } }] }] }, 'messages[0].content[0]'],
      [{ messages: [{ role: 'user', content: 'x' }], top_logprobs: 2 }, 'top_logprobs'],
    ];
    for (const [body, param] of chatBad) {
      const r = await post(url, '/v1/chat/completions', body);
      expect(r.status, JSON.stringify(body)).toBe(400);
      expect(r.json.error.param).toBe(param);
    }
    const n2 = await client.chat.completions.create({ model: M, messages: [{ role: 'user', content: 'x' }], n: 2 }).catch((e) => e);
    expect(n2).toBeInstanceOf(OpenAI.BadRequestError);
    expect(n2.param).toBe('n');

    const route = await fetch(`${url}/v1/embeddings`, { method: 'POST', body: '{}' });
    expect(route.status).toBe(404);
    shape(await route.json());
    const method = await fetch(`${url}/v1/chat/completions`);
    expect(method.status).toBe(405);
    expect(method.headers.get('allow')).toBe('POST');
    shape(await method.json());

    const small = await sideServer({ maxBodyBytes: 1000 });
    const big = await post(small, '/v1/completions', { prompt: 'x'.repeat(5000) });
    expect(big.status).toBe(413);
    expect(big.json.error.code).toBe('payload_too_large');
    const viaClient = await new OpenAI({ baseURL: `${small}/v1`, apiKey: 'x', maxRetries: 0 }).completions.create({ model: M, prompt: 'y'.repeat(5000) }).catch((e) => e);
    expect(viaClient.status).toBe(413);
    // The server still serves after all that.
    expect((await post(small, '/v1/completions', { prompt: 'Once', max_tokens: 2 })).status).toBe(200);
    expect(await metric('qalora_requests_total{route="other",method="POST",status="404"}')).toBeGreaterThanOrEqual(1);
  });

  it('--api-key protects everything but /health', async () => {
    const base = await sideServer({ apiKey: 'sk-qalora-test' });
    const none = await fetch(`${base}/v1/models`);
    expect(none.status).toBe(401);
    expect(none.headers.get('www-authenticate')).toBe('Bearer');
    expect((await none.json()).error.code).toBe('invalid_api_key');
    expect((await fetch(`${base}/metrics`)).status).toBe(401);
    expect((await fetch(`${base}/nowhere`)).status).toBe(401);
    expect((await fetch(`${base}/health`)).status).toBe(200);
    const wrong = await new OpenAI({ baseURL: `${base}/v1`, apiKey: 'sk-wrong', maxRetries: 0 }).models.list().catch((e) => e);
    expect(wrong).toBeInstanceOf(OpenAI.AuthenticationError);
    const right = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'sk-qalora-test', maxRetries: 0 });
    expect((await right.models.list()).data[0].id).toBe('stories260K');
    const r = await right.completions.create({ model: M, prompt: 'Once upon a time', max_tokens: 8, temperature: 0 });
    expect(r.choices[0].text).toBe(reference('Once upon a time', { temperature: 0, maxTokens: 8 }));
  });
});
