// `qalora train`: fine-tune QA-LoRA adapters on an INT-b base (the spec's quantization of --model).
import type { Command } from 'commander';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { ResolvedSpec } from '../../dsl/resolved.ts';
import { QaloraError } from '../errors.ts';
import { defaultLearningRate, readConfigFile, resolveTrainConfig, type TrainConfig } from '../train/config.ts';
import { chatTemplateFor, defaultSeqLen, dataTokenizerFor, openForRun, prepareData, tokenizerSource } from '../train/setup.ts';
import { train, type TrainResult } from '../train/trainer.ts';
import { dataParallelFromEnv, type DataParallel } from '../train/distributed.ts';
import { launchRanks } from '../train/launch.ts';
import { loadSpecOrFail } from '../../compiler/spec-file.ts';
import { formatBytes } from '../progress.ts';
import { announceImpliedSpec, peakRssBytes } from './report.ts';
import { requantizeOption, tablesOption } from './options.ts';
import { OpProfile } from '../model/profile.ts';

const FLAG_KEYS: Record<string, keyof TrainConfig> = {
  model: 'model', tokenizer: 'tokenizer', spec: 'spec', data: 'data', format: 'format', separator: 'separator', chatTemplate: 'chatTemplate', out: 'out',
  lr: 'lr', schedule: 'schedule', warmup: 'warmup', batchSize: 'batchSize', gradAccum: 'gradAccum', maxSteps: 'maxSteps',
  epochs: 'epochs', seqLen: 'seqLen', valFraction: 'valFraction', evalEvery: 'evalEvery', evalWindows: 'evalWindows',
  saveEvery: 'saveEvery', seed: 'seed', maxGradNorm: 'maxGradNorm', weightDecay: 'weightDecay', dropout: 'dropout',
  backend: 'backend', resume: 'resume', quiet: 'quiet', requantize: 'requantize', tables: 'tables',
  gradientCheckpointing: 'gradientCheckpointing',
};

export function withDropout(spec: ResolvedSpec, dropout: number | undefined): ResolvedSpec {
  if (dropout === undefined) return spec;
  return { ...spec, layers: spec.layers.map((l) => ({ ...l, dropout })) };
}

export interface RunSummary {
  result: TrainResult;
  config: TrainConfig;
  lr: number;
  totalSteps: number;
  trainWindows: number;
  valWindows: number;
}

/**
 * Runs a training job from a resolved configuration (the CLI and the demo share it). With `profile`, every op of
 * each step is timed; the table is logged at the end and written to profile.json in the run directory.
 */
export async function runTraining(c: TrainConfig, log: (s: string) => void = (s) => process.stderr.write(s + '\n'), dp?: DataParallel | null, profile?: OpProfile): Promise<RunSummary> {
  if (dp && !dp.isRoot) log = () => {}; // rank 0 speaks for the job
  // Without --spec a quantized file (GGUF Q4_0/Q4_1/Q8_0) trains on its own blocks with the default adapter settings.
  const given = c.spec ? withDropout(loadSpecOrFail(c.spec), c.dropout) : undefined;
  const opened = await openForRun({
    model: c.model, tokenizer: c.tokenizer, spec: given, backend: c.backend, seed: c.seed, requantize: c.requantize, tables: c.tables,
    checkpointing: c.gradientCheckpointing, inferred: c.dropout === undefined ? undefined : { dropout: c.dropout }, profile,
  });
  const { model, tokenizer } = opened;
  const spec = model.spec;
  if (!spec) throw new QaloraError(`${c.model} is a float model: train needs --spec, the QA-LoRA layers (bits, group, rank) to quantize its base into`);
  announceImpliedSpec(opened.impliedSpec, (s) => log(s.trimEnd()));
  const seqLen = c.seqLen ?? defaultSeqLen(model.config.context);
  const dtok = dataTokenizerFor(tokenizer, tokenizerSource(c.model, c.tokenizer));
  const chat = chatTemplateFor(c.model, c.chatTemplate);
  const data = prepareData(c.data, dtok, seqLen, c.valFraction, {
    format: c.format, separator: c.separator, chatTemplate: chat.template, bosToken: chat.bos, eosToken: chat.eos,
  });
  const { train: tw, val } = data.split;
  const perStep = c.batchSize * c.gradAccum * (dp?.size ?? 1); // windows per optimizer step, over all ranks
  const totalSteps = c.maxSteps ?? Math.max(1, Math.ceil(((c.epochs ?? 1) * tw.count) / perStep));
  const lr = c.lr ?? defaultLearningRate(model.config.dim);
  log(`data: ${data.examples} examples, ${data.tokens} tokens${data.cached ? ' (cached)' : ''} → ${tw.count} training windows of ${seqLen}` +
    `${val ? `, ${val.count} held out` : ''}; ${totalSteps} steps of ${perStep} windows (${((totalSteps * perStep) / tw.count).toFixed(2)} epochs), lr ${lr}`);
  mkdirSync(c.out, { recursive: true });
  if (!dp || dp.isRoot) writeFileSync(join(c.out, 'run.json'), JSON.stringify({ ...c, resume: false, lr, seqLen, maxSteps: totalSteps }, null, 2) + '\n');
  const layers = spec.layers.filter((l) => l.rank > 0);
  const result = await train({
    model, train: tw, val, outDir: c.out,
    adapterInfo: {
      kind: 'qalora', pool: layers[0]?.pool ?? 'mean', dropout: layers[0]?.dropout ?? 0, bits: layers[0]?.bits,
      groups: Object.fromEntries(layers.filter((l) => l.projection).map((l) => [l.projection!, l.group])), baseModel: c.model,
    },
    lr, schedule: c.schedule, warmup: c.warmup, batchSize: c.batchSize, gradAccum: c.gradAccum, totalSteps,
    evalEvery: c.evalEvery, evalWindows: c.evalWindows, saveEvery: c.saveEvery, seed: c.seed, maxGradNorm: c.maxGradNorm,
    weightDecay: c.weightDecay, resume: c.resume, quiet: c.quiet,
    fingerprint: { data: data.cacheKey.replace(/^.*\//, ''), spec: spec.name }, dist: dp, profile,
  });
  if (profile && (!dp || dp.isRoot)) {
    log(profile.table());
    writeFileSync(join(c.out, 'profile.json'), JSON.stringify(profile.report(), null, 2) + '\n');
  }
  log(`peak memory: ${formatBytes(peakRssBytes())} resident`);
  return { result, config: c, lr, totalSteps, trainWindows: tw.count, valWindows: val?.count ?? 0 };
}

export function register(program: Command): void {
  program
    .command('train')
    .description('fine-tune QA-LoRA adapters on the INT-b base of --model (quantized per --spec); writes adapters in PEFT format')
    .option('--config <file>', 'YAML or JSON file with any of these settings (flags override it)')
    .option('--model <path>', 'base model (llama2.c .bin, GGUF, HF directory, GPTQ, or a qalora .safetensors)')
    .option('--tokenizer <path>', 'tokenizer file, when not found with the model')
    .option('--spec <file>', 'QA-LoRA spec (.qal): bits, group size, rank, alpha, dropout per projection (default for a GGUF Q4_0/Q4_1/Q8_0 file: its own blocks, rank 64, alpha 16)')
    .option('--data <file>', 'training data: text (split on --separator), JSONL {text}, Alpaca JSON/JSONL, or chat {messages}')
    .option('--format <name>', 'force the data format: text | jsonl-text | alpaca | chat')
    .option('--separator <s>', 'document separator in plain text (default <|endoftext|>)')
    .option('--chat-template <file>', "chat data: Jinja template, or a tokenizer_config.json (default: the model's own, else a plain one)")
    .option('--out <dir>', 'run directory: checkpoint/, adapter/, metrics.jsonl, loss.svg, loss.png')
    .option('--resume', 'continue the run in --out from its last checkpoint (exactly: same losses as uninterrupted)')
    .option('--lr <x>', 'peak learning rate (default 2e-4·√(4096/dim), capped at 3e-3)')
    .option('--schedule <name>', 'constant (default, as the reference) | cosine | linear')
    .option('--warmup <n>', 'warmup steps, or a fraction of all steps when < 1 (default 0.03)')
    .option('--batch-size <n>', 'sequences per micro-batch (default 4)')
    .option('--grad-accum <n>', 'micro-batches per optimizer step (default 1)')
    .option('--max-steps <n>', 'optimizer steps (default: --epochs worth)')
    .option('--epochs <n>', 'passes over the training windows (default 1)')
    .option('--seq-len <n>', 'tokens per training window (default min(context, 256))')
    .option('--val-fraction <x>', 'held-out fraction of the data for validation (default 0.05)')
    .option('--eval-every <n>', 'validate every n steps (default 50; 0: only at the end)')
    .option('--eval-windows <n>', 'validation windows per evaluation (default all)')
    .option('--save-every <n>', 'checkpoint every n steps (default 100; always at the end and on Ctrl-C)')
    .option('--seed <n>', 'seed of adapter init, data order and dropout (default 42)')
    .option('--max-grad-norm <x>', 'clip the global gradient norm (default 0.3; 0: off)')
    .option('--weight-decay <x>', 'AdamW weight decay (default 0)')
    .option('--dropout <p>', "override the spec's LoRA dropout")
    .option('--backend <name>', 'cpu (default) | cuda | emu')
    .option('--gradient-checkpointing <mode>', "auto (default): keep every block's activations for backward when they fit half the free memory, else recompute each block | on: always recompute (least memory) | off: always keep")
    .addOption(requantizeOption())
    .addOption(tablesOption())
    .option('--quiet', 'no progress bar')
    .option('--profile', "time every op of each step and print where a step's time goes (also written to profile.json)")
    .option('--nproc <n>', 'data-parallel: start n ranks with mpirun (needs MPI); --batch-size is per rank')
    .option('--hostfile <file>', "with --nproc: MPI hostfile of the machines to run on (each needs this checkout at the same path)")
    .action(async (o: Record<string, unknown>) => {
      if (o.nproc !== undefined && Number(o.nproc) !== 1) {
        process.exitCode = await launchRanks(Number(o.nproc), process.argv.slice(process.argv.indexOf('train') + 1), o.hostfile as string | undefined);
        return;
      }
      const dp = await dataParallelFromEnv();
      const flags: Record<string, unknown> = {};
      for (const [k, v] of Object.entries(o)) if (k in FLAG_KEYS && v !== undefined) flags[FLAG_KEYS[k]] = v;
      let base: Record<string, unknown> = {};
      // --resume --out DIR alone picks up the run's own settings.
      const runJson = typeof flags.out === 'string' ? join(flags.out, 'run.json') : '';
      if (flags.resume && runJson && existsSync(runJson)) base = JSON.parse(readFileSync(runJson, 'utf8'));
      else if (flags.resume && !flags.model && !o.config) throw new QaloraError(`--resume: ${flags.out ?? '(no --out)'} is not a training run directory (no run.json); give --out of an earlier run`);
      const file = typeof o.config === 'string' ? readConfigFile(o.config) : {};
      const c = resolveTrainConfig({ ...base, ...file }, flags, typeof o.config === 'string' ? o.config : 'config');
      const s = await runTraining(c, undefined, dp, o.profile ? new OpProfile() : undefined).catch((e) => (dp ? dp.fail(e) : Promise.reject(e)));
      dp?.finalize();
      if (dp && !dp.isRoot) return;
      const r = s.result;
      const last = r.evals[r.evals.length - 1];
      process.stdout.write(
        `${r.interrupted ? 'stopped' : 'trained'} ${r.steps}/${s.totalSteps} steps in ${r.seconds.toFixed(1)} s (${Math.round(r.tokensPerSecond)} tokens/s)` +
          (last ? `; validation loss ${last.loss.toFixed(4)}, perplexity ${last.perplexity.toFixed(3)}` : '') + '\n' +
          (r.interrupted ? `checkpoint: ${r.checkpointDir}\n` : `adapter: ${r.adapterDir}\n`),
      );
    });
}
