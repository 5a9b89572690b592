// A small real fine-tune shared by the merge, export and train tests: stories260K, INT4 (specs/stories260k.qal,
// CPU build), a few steps on a slice of tinyshakespeare so the adapters are far from their zero-B start.
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadSpecOrFail } from '../compiler/spec-file.ts';
import type { ResolvedSpec } from '../dsl/resolved.ts';
import type { LlamaModel } from '../runtime/model/llama.ts';
import type { Tokenizer } from '../runtime/tokenizer/types.ts';
import { dataTokenizerFor, openForRun, prepareData } from '../runtime/train/setup.ts';
import { train, type TrainResult } from '../runtime/train/trainer.ts';
import { fixture, repoRoot } from './fixtures.ts';

export const STORIES = 'models/stories260K/stories260K.bin';
export const TOK = 'models/stories260K/tok512.bin';
export const SHAKESPEARE = 'data/shakespeare/tinyshakespeare.txt';

export interface TrainedStories {
  model: LlamaModel;
  tokenizer: Tokenizer;
  spec: ResolvedSpec;
  dir: string;
  dataFile: string;
  result: TrainResult;
}

/** A 40 KB slice keeps tokenization and training to seconds. */
export function shakespeareSlice(dir: string, bytes = 40_000): string {
  const p = join(dir, 'shakespeare-slice.txt');
  writeFileSync(p, readFileSync(fixture(SHAKESPEARE), 'utf8').slice(0, bytes));
  return p;
}

/** specs/stories260k.qal, or (text) a variant of it, e.g. with `pool sum` (written beside the run, own addon). */
export function storiesSpec(dir?: string, edit?: (text: string) => string): ResolvedSpec {
  const quiet = { write: () => true } as unknown as NodeJS.WritableStream;
  const file = join(repoRoot, 'specs/stories260k.qal');
  if (!edit) return loadSpecOrFail(file, quiet);
  const variant = join(dir!, 'variant.qal');
  writeFileSync(variant, edit(readFileSync(file, 'utf8')));
  return loadSpecOrFail(variant, quiet);
}

export async function trainStories(steps = 12, opts: { resume?: boolean; dir?: string; stopAfter?: number; seed?: number; spec?: ResolvedSpec } = {}): Promise<TrainedStories> {
  const dir = opts.dir ?? mkdtempSync(join(tmpdir(), 'qalora-stories-'));
  mkdirSync(dir, { recursive: true });
  const spec = opts.spec ?? storiesSpec();
  const layers = spec.layers.filter((l) => l.projection);
  const { model, tokenizer } = await openForRun({ model: fixture(STORIES), tokenizer: fixture(TOK), spec, backend: 'cpu', seed: opts.seed ?? 1 });
  const dataFile = shakespeareSlice(dir);
  const data = prepareData(dataFile, dataTokenizerFor(tokenizer, fixture(TOK)), 64, 0.1);
  let n = 0;
  const result = await train({
    model, train: data.split.train, val: data.split.val, outDir: join(dir, 'run'),
    adapterInfo: { kind: 'qalora', groups: Object.fromEntries(layers.map((l) => [l.projection!, l.group])), pool: layers[0].pool, dropout: 0.05, bits: 4 },
    lr: 3e-3, schedule: 'constant', warmup: 0, batchSize: 4, gradAccum: 1, totalSteps: steps, evalEvery: 0, evalWindows: 4,
    saveEvery: 0, seed: opts.seed ?? 1, maxGradNorm: 0.3, weightDecay: 0, resume: opts.resume ?? false, quiet: true, plot: false,
    handleSigint: false, shouldStop: opts.stopAfter ? () => ++n >= opts.stopAfter! : undefined,
  });
  return { model, tokenizer, spec: model.spec!, dir, dataFile, result };
}
