// `qalora demo`: the whole job end to end in a few minutes on a laptop-class CPU — compile the stories260K spec,
// quantize stories260K to INT4, fine-tune QA-LoRA adapters on a slice of Shakespeare (out of its TinyStories
// domain, so the loss visibly falls), merge them into the INT4 offsets, compare held-out perplexity before and
// after, and sample from the merged INT4 model.
import type { Command } from 'commander';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadSpecOrFail } from '../../compiler/spec-file.ts';
import { demoAssets } from '../assets.ts';
import { QaloraError } from '../errors.ts';
import { LlamaModel } from '../model/llama.ts';
import { sparkline } from '../progress.ts';
import { Sampler } from '../sampling.ts';
import { StreamDecoder } from '../tokenizer/types.ts';
import { evaluateWindows } from '../train/evaluate.ts';
import { dataTokenizerFor, openForRun, prepareData, tokenizerSource } from '../train/setup.ts';
import { train } from '../train/trainer.ts';
import { mergeModel, saveMerged } from './merge.ts';

export interface DemoOptions {
  model: string;
  tokenizer?: string;
  spec: string;
  data: string;
  /** Characters of the data file to use (default 300 000: a few minutes of training). */
  dataChars: number;
  out: string;
  steps: number;
  batchSize: number;
  seqLen: number;
  lr: number;
  seed: number;
  evalWindows: number;
  prompt: string;
  sampleTokens: number;
  quiet: boolean;
  write: (s: string) => void;
}

export interface DemoResult {
  floatPerplexity: number;
  basePerplexity: number;
  mergedPerplexity: number;
  adapterPerplexity: number;
  losses: number[];
  /** Held-out loss at each evaluation (step 0 first). */
  valLosses: number[];
  sample: string;
  mergedPath: string;
  seconds: number;
}

export async function runDemo(o: DemoOptions): Promise<DemoResult> {
  const t0 = performance.now();
  const say = o.write;
  for (const p of [o.model, o.data, o.spec]) if (!existsSync(p)) throw new QaloraError(`${p}: not found (pass --model/--data/--spec to use your own files)`);
  mkdirSync(o.out, { recursive: true });
  // A slice of the data, cut at a line break, so tokenization and training stay short.
  const text = readFileSync(o.data, 'utf8');
  const slice = text.length > o.dataChars ? text.slice(0, text.lastIndexOf('\n', o.dataChars) + 1) : text;
  const dataFile = join(o.out, 'data.txt');
  writeFileSync(dataFile, slice);

  say(`1/6 compiling ${o.spec} and building its CPU kernels (cached after the first run)…`);
  const spec = loadSpecOrFail(o.spec, { write: () => true } as unknown as NodeJS.WritableStream);
  const layer = spec.layers.find((l) => l.rank > 0);
  say(`2/6 quantizing ${o.model} to INT${layer?.bits} (group ${layer?.group}, min-max round-to-nearest)…`);
  const { model, tokenizer } = await openForRun({ model: o.model, tokenizer: o.tokenizer, spec, backend: 'cpu', seed: o.seed });
  const floatModel = (await openForRun({ model: o.model, tokenizer: o.tokenizer })).model;
  const tokSource = tokenizerSource(o.model, o.tokenizer);
  const data = prepareData(dataFile, dataTokenizerFor(tokenizer, tokSource), o.seqLen, 0.1);
  const val = data.split.val;
  if (!val) throw new QaloraError(`${o.data}: too little data for a held-out split`);
  const evalPpl = (m: Pick<LlamaModel, 'loss'>) => evaluateWindows(m, val, o.batchSize, o.evalWindows).perplexity;
  const floatPpl = evalPpl(floatModel);
  const basePpl = evalPpl(model); // B = 0: exactly the INT4 base
  say(`   ${data.tokens} tokens → ${data.split.train.count} training windows of ${o.seqLen}, ${val.count} held out`);
  say(`   held-out perplexity: float ${floatPpl.toFixed(2)}, INT4 base ${basePpl.toFixed(2)}`);

  say(`3/6 fine-tuning QA-LoRA adapters (rank ${layer?.rank}, ${o.steps} steps of ${o.batchSize}×${o.seqLen} tokens)…`);
  const runDir = join(o.out, 'run');
  const r = await train({
    model, train: data.split.train, val, outDir: runDir,
    adapterInfo: {
      kind: 'qalora', pool: layer?.pool ?? 'mean', dropout: layer?.dropout ?? 0, bits: layer?.bits,
      groups: Object.fromEntries(spec.layers.filter((l) => l.projection && l.rank > 0).map((l) => [l.projection!, l.group])),
      baseModel: o.model,
    },
    lr: o.lr, schedule: 'constant', warmup: 0.03, batchSize: o.batchSize, gradAccum: 1, totalSteps: o.steps,
    evalEvery: Math.max(1, Math.floor(o.steps / 4)), evalWindows: o.evalWindows, saveEvery: 0, seed: o.seed,
    maxGradNorm: 0.3, weightDecay: 0, resume: false, quiet: o.quiet, printSummary: false,
  });
  const adapterPpl = r.evals.length ? r.evals[r.evals.length - 1].perplexity : NaN;
  say(`   loss ${r.losses[0].toFixed(3)} ${sparkline(r.losses, 48)} ${r.losses[r.losses.length - 1].toFixed(3)}  (${Math.round(r.tokensPerSecond)} tokens/s; plot: ${join(runDir, 'loss.png')})`);

  say('4/6 merging the adapters into the INT4 offsets (β += s·c·B·A; q and α untouched)…');
  const { weights, report } = await mergeModel(model);
  const mergedPath = join(o.out, 'merged-int4.safetensors');
  saveMerged(mergedPath, weights, model, tokSource !== o.model ? tokSource : o.tokenizer);
  const merged = await LlamaModel.create(weights, { backend: 'cpu', spec: model.spec, adapters: weights.blocks.map(() => ({})) });
  say(`   ${report.quant} layers merged → ${mergedPath}`);

  say('5/6 evaluating the merged INT4 model on the held-out text…');
  const mergedPpl = evalPpl(merged);
  say(`   held-out perplexity: INT4 base ${basePpl.toFixed(2)} → merged INT4 ${mergedPpl.toFixed(2)} (float base ${floatPpl.toFixed(2)})`);

  say(`6/6 sampling from the merged INT4 model (prompt ${JSON.stringify(o.prompt)}, temperature 0.8, seed ${o.seed}):`);
  const sampler = new Sampler(merged.config.vocab, { temperature: 0.8, topP: 0.9, seed: o.seed });
  const ids = tokenizer.encode(o.prompt, { bos: true });
  const session = merged.newSession();
  let logits = session.prefill(ids);
  const dec = new StreamDecoder(tokenizer, ids[ids.length - 1]);
  let sample = o.prompt;
  const history = [...ids];
  for (let i = 0; i < o.sampleTokens && session.pos < merged.config.context; i++) {
    const next = sampler.sample(logits, history);
    if (next === tokenizer.eos || next === tokenizer.bos) break;
    history.push(next);
    sample += dec.push(next);
    logits = session.step(next);
  }
  sample += dec.flush();
  say('');
  say(sample.split('\n').map((l) => '   │ ' + l).join('\n'));
  const seconds = (performance.now() - t0) / 1000;
  say('');
  say(`done in ${seconds.toFixed(0)} s. Next: qalora export --model ${mergedPath} --format gguf --out model.gguf  (runs in llama.cpp as Q4_1)`);
  return { floatPerplexity: floatPpl, basePerplexity: basePpl, mergedPerplexity: mergedPpl, adapterPerplexity: adapterPpl, losses: r.losses, valLosses: r.evals.map((e) => e.loss), sample, mergedPath, seconds };
}

export function register(program: Command): void {
  program
    .command('demo')
    .description('end to end in a few minutes: quantize stories260K to INT4, fine-tune QA-LoRA on Shakespeare, merge, evaluate, sample')
    .option('--model <path>', 'base model', demoAssets.model)
    .option('--tokenizer <path>', 'tokenizer file (default: found with the model)')
    .option('--spec <file>', 'QA-LoRA spec', demoAssets.spec)
    .option('--data <file>', 'fine-tuning text', demoAssets.data)
    .option('--data-chars <n>', 'use the first n characters of the data', '300000')
    .option('--out <dir>', 'where the run, merged model and plots go', 'runs/demo')
    .option('--steps <n>', 'training steps', '200')
    .option('--batch-size <n>', 'sequences per step', '8')
    .option('--seq-len <n>', 'tokens per sequence', '128')
    .option('--lr <x>', 'learning rate', '3e-3')
    .option('--seed <n>', 'seed', '7')
    .option('--eval-windows <n>', 'held-out windows per evaluation', '64')
    .option('--prompt <text>', 'prompt for the sample', 'ROMEO:')
    .option('--sample-tokens <n>', 'tokens to sample', '120')
    .option('--quiet', 'no progress bar')
    .action(async (o: Record<string, string | boolean | undefined>) => {
      const num = (k: string) => {
        const v = Number(o[k]);
        if (!Number.isFinite(v) || v <= 0) throw new QaloraError(`--${k.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase())} must be a positive number, got ${o[k]}`);
        return v;
      };
      await runDemo({
        model: o.model as string, tokenizer: o.tokenizer as string | undefined, spec: o.spec as string, data: o.data as string,
        dataChars: num('dataChars'), out: o.out as string, steps: num('steps'), batchSize: num('batchSize'), seqLen: num('seqLen'),
        lr: num('lr'), seed: num('seed'), evalWindows: num('evalWindows'), prompt: o.prompt as string, sampleTokens: num('sampleTokens'),
        quiet: Boolean(o.quiet), write: (s) => process.stdout.write(s + '\n'),
      });
    });
}
