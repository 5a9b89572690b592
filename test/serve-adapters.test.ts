// Serving QA-LoRA models: a 4-bit stories260K base (specs/stories260k.qal) with an adapter chosen per request by
// `model` (unmerged, as vLLM's --lora-modules), checked against generate() on a model opened with that adapter;
// then `qalora serve --model MERGED` (a short real fine-tune, merged) as a real process: the openai client's
// streamed chat prints token by token,
// the greedy text equals generate() on the merged file, and SIGTERM lets a running stream finish before exit.
import { spawn, type ChildProcess } from 'node:child_process';
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { savePeftAdapter } from '../runtime/adapters/peft.ts';
import { mergeModel, saveMerged } from '../runtime/cli/merge.ts';
import { generate } from '../runtime/model/generate.ts';
import { openModel, type OpenedModel } from '../runtime/model/open.ts';
import { createQaloraServer } from '../runtime/serve/load.ts';
import type { QaloraServer } from '../runtime/serve/server.ts';
import { openForRun } from '../runtime/train/setup.ts';
import { fixture, repoRoot } from './fixtures.ts';
import { trainStories } from './train-fixture.ts';

const MODEL = 'models/stories260K/stories260K.bin';
const TOK = 'models/stories260K/tok512.bin';
const SPEC = join(repoRoot, 'specs/stories260k.qal');

let dir: string;
let adapterDir: string;
let server: QaloraServer;
let client: OpenAI;
let base: OpenedModel;
let tuned: OpenedModel;

function continuation(m: OpenedModel, prompt: string, maxTokens: number): string {
  const text = generate(m.model, m.tokenizer, { prompt, temperature: 0, maxTokens }).text;
  expect(text.startsWith(prompt)).toBe(true);
  return text.slice(prompt.length);
}

/** An adapter far from its zero-B start: B drawn from a fixed LCG, so the test needs no training run. */
async function writeAdapter(to: string): Promise<void> {
  const m = await openModel({ model: fixture(MODEL), tokenizer: fixture(TOK), spec: SPEC, backend: 'cpu', seed: 5 });
  let state = 12345;
  const next = () => ((state = (Math.imul(state, 1103515245) + 12345) >>> 0) / 2 ** 32) * 2 - 1;
  for (const block of m.model.adapters) for (const ad of Object.values(block)) for (let i = 0; i < ad!.b.length; i++) ad!.b[i] = 0.6 * next();
  savePeftAdapter(to, m.model.adapters, { kind: 'qalora', groups: { q: 32, k: 32, v: 32, o: 32, gate: 32, up: 32, down: 43 }, pool: 'mean', dropout: 0, bits: 4 });
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'qalora-serve-'));
  adapterDir = join(dir, 'adapter');
  await writeAdapter(adapterDir);
  server = await createQaloraServer({
    model: fixture(MODEL), tokenizer: fixture(TOK), spec: SPEC, loras: [`shakespeare=${adapterDir}`, `again=${adapterDir}`], modelName: 'stories-int4',
  });
  const a = await server.listen(0);
  client = new OpenAI({ baseURL: `http://127.0.0.1:${a.port}/v1`, apiKey: 'x', maxRetries: 0 });
  base = await openModel({ model: fixture(MODEL), tokenizer: fixture(TOK), spec: SPEC, backend: 'cpu' });
  tuned = await openModel({ model: fixture(MODEL), tokenizer: fixture(TOK), spec: SPEC, adapter: adapterDir, backend: 'cpu' });
});

afterAll(async () => {
  await server?.shutdown(1000);
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('qalora serve: adapters chosen by model', () => {
  it('lists the base and every adapter; each request runs the adapter it names', async () => {
    const models = (await client.models.list()).data;
    expect(models.map((m) => m.id)).toEqual(['stories-int4', 'shakespeare', 'again']);
    expect(models[1]).toMatchObject({ parent: 'stories-int4' });

    const prompt = 'Once upon a time';
    const ask = async (model: string) => (await client.completions.create({ model, prompt, max_tokens: 40, temperature: 0 })).choices[0].text;
    const [b, s] = [await ask('stories-int4'), await ask('shakespeare')];
    expect(b).toBe(continuation(base, prompt, 40));
    expect(s).toBe(continuation(tuned, prompt, 40));
    expect(s).not.toBe(b);
  });

  it('base and adapter streams run side by side, each matching its own model', async () => {
    const jobs = [
      ['stories-int4', 'The cat'], ['shakespeare', 'The cat'], ['again', 'Lily was'], ['stories-int4', 'Lily was'],
      ['shakespeare', 'One day'], ['stories-int4', 'One day'],
    ] as const;
    const texts = await Promise.all(jobs.map(async ([model, prompt]) => {
      const s = await client.chat.completions.create({ model, messages: [{ role: 'user', content: prompt }], max_tokens: 24, temperature: 0, stream: true });
      let t = '';
      for await (const c of s) t += c.choices[0]?.delta.content ?? '';
      return t;
    }));
    jobs.forEach(([model, prompt], i) => expect(texts[i], `${model}: ${prompt}`).toBe(continuation(model === 'stories-int4' ? base : tuned, prompt, 24)));
  });

  it('refuses an adapter that does not fit, naming it', async () => {
    await expect(createQaloraServer({ model: fixture(MODEL), tokenizer: fixture(TOK), loras: [`x=${adapterDir}`] })).rejects.toThrow(/--lora needs a QA-LoRA model/);
    await expect(createQaloraServer({ model: fixture(MODEL), tokenizer: fixture(TOK), spec: SPEC, loras: [`x=${dir}/missing`] })).rejects.toThrow(/--lora x=.*missing.*not an adapter directory/);
    await expect(createQaloraServer({ model: fixture(MODEL), tokenizer: fixture(TOK), spec: SPEC, loras: ['noequals'] })).rejects.toThrow(/expected NAME=DIR/);
    // Same tensors, but trained with PEFT's pooling: the base's kernels pool differently, so it must not load.
    const peft = join(dir, 'peft-pooled');
    cpSync(adapterDir, peft, { recursive: true });
    const cfg = JSON.parse(readFileSync(join(peft, 'adapter_config.json'), 'utf8'));
    writeFileSync(join(peft, 'adapter_config.json'), JSON.stringify({ ...cfg, qalora_pooling: 'peft' }));
    await expect(createQaloraServer({ model: fixture(MODEL), tokenizer: fixture(TOK), spec: SPEC, loras: [`p=${peft}`] })).rejects.toThrow(/--lora p=.*'peft' pooling but the model's spec pools 'mean'/);
  });
});

describe('qalora serve --model MERGED (the CLI)', () => {
  let proc: ChildProcess | undefined;
  afterAll(() => {
    if (proc && proc.exitCode === null) proc.kill('SIGKILL');
  });

  it('serves stories260K fine-tuned and merged, streams chat token by token, and drains on SIGTERM', async () => {
    // A short real fine-tune (tinyshakespeare), merged into the INT4 base's offsets as `qalora merge` does.
    const trained = await trainStories(10, { dir: join(dir, 'train') });
    const merged = join(dir, 'merged.safetensors');
    const { weights } = await mergeModel(trained.model);
    saveMerged(merged, weights, trained.model, fixture(TOK));
    const reference = await openForRun({ model: merged, backend: 'cpu' });

    proc = spawn(process.execPath, [join(repoRoot, 'bin/qalora.mjs'), 'serve', '--model', merged, '--port', '0', '--api-key', 'k1'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '', err = '';
    proc.stderr!.on('data', (d) => (err += d));
    const exited = new Promise<number | null>((res) => proc!.on('exit', (code) => res(code)));
    const port = await new Promise<number>((resolve, reject) => {
      proc!.stdout!.on('data', (d) => {
        out += d;
        const m = /listening on http:\/\/127\.0\.0\.1:(\d+)\/v1/.exec(out);
        if (m) resolve(Number(m[1]));
      });
      proc!.on('exit', (code) => reject(new Error(`serve exited with ${code}: ${err}`)));
    });
    const c = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: 'k1', maxRetries: 0 });
    expect((await c.models.list()).data.map((m) => m.id)).toEqual(['merged']);

    const prompt = 'Once upon a time';
    const stream = await c.chat.completions.create({ model: 'merged', messages: [{ role: 'user', content: prompt }], max_tokens: 50, temperature: 0, stream: true });
    const deltas: string[] = [];
    for await (const ch of stream) if (ch.choices[0]?.delta.content) deltas.push(ch.choices[0].delta.content);
    expect(deltas.length).toBeGreaterThan(20);
    expect(deltas.join('')).toBe(continuation(reference, prompt, 50));

    // SIGTERM while a long stream runs: the stream still completes, then the process exits cleanly.
    const long = await c.completions.create({ model: 'merged', prompt: 'One day', max_tokens: 300, temperature: 0, stream: true });
    const iter = long[Symbol.asyncIterator]();
    await iter.next();
    proc.kill('SIGTERM');
    let text = '', finish: string | null = null;
    for (let r = await iter.next(); !r.done; r = await iter.next()) {
      text += r.value.choices[0]?.text ?? '';
      finish = r.value.choices[0]?.finish_reason ?? finish;
    }
    expect(finish).not.toBeNull();
    expect(text.length).toBeGreaterThan(0);
    expect(await exited).toBe(0);
    expect(out).toMatch(/SIGTERM: draining/);
    expect(out).toMatch(/stopped \(all requests finished\)/);
    await expect(fetch(`http://127.0.0.1:${port}/health`)).rejects.toThrow();
  });
});
