// `qalora eval`: cross-entropy, perplexity and tokens/s of a model (float, INT-b base, base + adapter, or merged)
// on a data file, over the same packed windows training uses.
import type { Command } from 'commander';
import type { LlamaModel } from '../model/llama.ts';
import { QaloraError } from '../errors.ts';
import { Progress } from '../progress.ts';
import { evaluateWindows, type EvalResult } from '../train/evaluate.ts';
import { dataTokenizerFor, defaultSeqLen, openForRun, prepareData, tokenizerSource } from '../train/setup.ts';
import type { Tokenizer } from '../tokenizer/types.ts';
import { requantizeOption, tablesOption } from './options.ts';
import type { TableType } from '../../dsl/resolved.ts';
import { announceImpliedSpec, reportPeakMemory } from './report.ts';

export interface EvalOptions {
  data: string;
  seqLen?: number;
  batchSize?: number;
  /** 'all' windows of the file, or only the held-out 'val' split training would use. */
  split?: 'all' | 'val';
  valFraction?: number;
  maxWindows?: number;
  format?: 'text' | 'jsonl-text' | 'alpaca' | 'chat';
  separator?: string;
  quiet?: boolean;
}

export function evaluateFile(model: LlamaModel, tokenizer: Tokenizer, tokSource: string | undefined, o: EvalOptions): EvalResult & { windows: number } {
  const seqLen = o.seqLen ?? defaultSeqLen(model.config.context);
  const split = o.split ?? 'all';
  const data = prepareData(o.data, dataTokenizerFor(tokenizer, tokSource), seqLen, split === 'val' ? o.valFraction ?? 0.05 : 0, {
    format: o.format, separator: o.separator,
  });
  const windows = split === 'val' ? data.split.val : data.split.train;
  if (!windows) throw new QaloraError(`${o.data}: too little data for a validation split`);
  const n = o.maxWindows ? Math.min(o.maxWindows, windows.count) : windows.count;
  const bar = new Progress({ label: 'eval', total: n, unit: 'windows', silent: o.quiet });
  const r = evaluateWindows(model, windows, o.batchSize ?? 4, n, (done) => bar.update(done));
  bar.stop();
  return { ...r, windows: n };
}

export function register(program: Command): void {
  program
    .command('eval')
    .description('cross-entropy, perplexity and tokens/s of a model (optionally with an adapter) on a data file')
    .requiredOption('--model <path>', 'model: any format generate reads, or a merged qalora .safetensors')
    .requiredOption('--data <file>', 'text, JSONL, Alpaca or chat data (as for train)')
    .option('--tokenizer <path>', 'tokenizer file, when not found with the model')
    .option('--spec <file>', 'QA-LoRA spec: evaluate the INT-b base it quantizes --model into')
    .option('--adapter <dir>', 'PEFT adapter directory to apply (needs the spec it was trained with)')
    .option('--seq-len <n>', 'tokens per window (default min(context, 256))')
    .option('--batch-size <n>', 'windows per forward pass (default 4)', '4')
    .option('--split <which>', 'all (default) | val: only the held-out part train validates on', 'all')
    .option('--val-fraction <x>', 'held-out fraction, as given to train (default 0.05)', '0.05')
    .option('--max-windows <n>', 'evaluate at most n windows')
    .option('--format <name>', 'force the data format: text | jsonl-text | alpaca | chat')
    .option('--separator <s>', 'document separator in plain text')
    .option('--backend <name>', 'cpu (default) | cuda | emu', 'cpu')
    .addOption(requantizeOption())
    .addOption(tablesOption())
    .option('--quiet', 'no progress bar')
    .action(async (o: Record<string, string | boolean | undefined>) => {
      const int = (k: string) => (o[k] === undefined ? undefined : Number(o[k]));
      if (o.split !== 'all' && o.split !== 'val') throw new QaloraError(`--split must be all or val, got ${o.split}`);
      const opened = await openForRun({
        model: o.model as string, tokenizer: o.tokenizer as string | undefined, spec: o.spec as string | undefined,
        adapter: o.adapter as string | undefined, backend: o.backend as 'cpu', requantize: Boolean(o.requantize), inferred: { rank: 0 }, tables: o.tables as TableType | undefined,
      });
      announceImpliedSpec(opened.impliedSpec);
      const r = evaluateFile(opened.model, opened.tokenizer, tokenizerSource(o.model as string, o.tokenizer as string | undefined), {
        data: o.data as string, seqLen: int('seqLen'), batchSize: int('batchSize'), split: o.split as 'all' | 'val',
        valFraction: Number(o.valFraction), maxWindows: int('maxWindows'), format: o.format as undefined, separator: o.separator as string | undefined,
        quiet: Boolean(o.quiet),
      });
      process.stdout.write(
        `cross-entropy ${r.loss.toFixed(4)} nats/token, perplexity ${r.perplexity.toFixed(3)} over ${r.tokens} tokens ` +
          `(${r.windows} windows) at ${Math.round(r.tokensPerSecond)} tokens/s\n`,
      );
      reportPeakMemory();
    });
}
