// `qalora quantize`: turn a float checkpoint into the spec's QA-LoRA base once (round-to-nearest, or GPTQ on
// calibration text) and save it as our quantized-base file, which generate/train/eval/serve load directly.
import { Option, type Command } from 'commander';
import { statSync } from 'node:fs';
import { QaloraError } from '../errors.ts';
import { calibrationFromText } from '../model/calib.ts';
import { saveQuantizedBase } from '../model/basefile.ts';
import { openModel } from '../model/open.ts';
import type { BackendName } from '../model/types.ts';
import { Progress } from '../progress.ts';
import { number } from './generate.ts';
import { requantizeOption, tablesOption } from './options.ts';
import type { TableType } from '../../dsl/resolved.ts';
import { reportPeakMemory } from './report.ts';

interface QuantizeFlags {
  model: string;
  tokenizer?: string;
  spec: string;
  out: string;
  method: 'rtn' | 'gptq';
  calib?: string;
  calibSamples: string;
  calibTokens: string;
  backend: BackendName;
  quiet?: boolean;
  requantize?: boolean;
  tables?: TableType;
}

export function register(program: Command): void {
  program
    .command('quantize')
    .description('quantize a float model into the spec\'s QA-LoRA base (RTN or GPTQ) and save it (.safetensors)')
    .requiredOption('-m, --model <path>', 'float checkpoint: llama2.c .bin, GGUF, or HF directory')
    .requiredOption('--spec <file>', 'QA-LoRA spec: bits and group per projection')
    .requiredOption('-o, --out <file>', 'where to write the quantized base (.safetensors)')
    .option('-z, --tokenizer <path>', 'tokenizer file (default: the one in or beside the model)')
    .addOption(new Option('--method <m>', 'rtn: min-max round to nearest (data-free); gptq: GPTQ on --calib text').choices(['rtn', 'gptq']).default('rtn'))
    .option('--calib <file>', 'calibration text for GPTQ (documents separated by <|endoftext|>, or plain text)')
    .option('--calib-samples <n>', 'calibration sequences', '64')
    .option('--calib-tokens <n>', 'tokens per calibration sequence', '256')
    .addOption(new Option('--backend <name>', 'kernels used to quantize').choices(['cpu', 'cuda', 'emu']).default('cpu'))
    .addOption(requantizeOption())
    .addOption(tablesOption())
    .option('-q, --quiet', 'no progress bar')
    .action(async (o: QuantizeFlags) => {
      if (!o.out.endsWith('.safetensors')) throw new QaloraError(`--out ${o.out}: the quantized base is a .safetensors file`);
      if (o.method === 'gptq' && !o.calib) throw new QaloraError('--method gptq needs --calib FILE (calibration text)');
      if (o.method === 'rtn' && o.calib) throw new QaloraError('--calib is only used by --method gptq');
      const samples = number('--calib-samples', o.calibSamples, true), tokens = number('--calib-tokens', o.calibTokens, true);
      let bar: Progress | undefined;
      const t0 = performance.now();
      const { model } = await openModel({
        model: o.model, tokenizer: o.tokenizer, spec: o.spec, backend: o.backend, quantize: o.method, requantize: o.requantize, tables: o.tables,
        calib: o.calib ? (tok, config) => calibrationFromText(o.calib!, tok, { samples, tokens, context: config.context }) : undefined,
        onProgress: (done, total, what) => {
          bar ??= new Progress({ label: `quantize ${o.method}`, total, unit: 'layers', silent: o.quiet });
          bar.update(done, { layer: what });
        },
      });
      bar?.stop();
      const spec = model.spec!;
      saveQuantizedBase(o.out, model.weights, { spec: spec.name, method: o.method });
      const layers = model.weights.blocks.reduce((n, b) => n + Object.values(b.proj).filter((l) => l.kind === 'quant').length, 0);
      process.stderr.write(`quantized ${layers} layers (${o.method}) in ${((performance.now() - t0) / 1000).toFixed(1)} s → ${o.out} (${(statSync(o.out).size / 1e6).toFixed(2)} MB)\n`);
      reportPeakMemory();
    });
}
