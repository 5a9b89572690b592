// `qalora export`: a model (typically merged) to GGUF for llama.cpp, GPTQ with float zeros, or our safetensors.
import type { Command } from 'commander';
import { QaloraError } from '../errors.ts';
import { exportModel, EXPORT_FORMATS, type ExportFormat } from '../export/index.ts';
import { openForRun, tokenizerSource } from '../train/setup.ts';

export function register(program: Command): void {
  program
    .command('export')
    .description('export a model: gguf (Q4_1/Q5_1 blocks for INT-b layers, exact), gptq (float zeros), or safetensors (ours)')
    .requiredOption('--model <path>', 'model to export (a merged qalora .safetensors, or any loadable checkpoint)')
    .requiredOption('--format <name>', `one of ${EXPORT_FORMATS.join(', ')}`)
    .requiredOption('--out <path>', 'output file (gguf, safetensors) or directory (gptq)')
    .option('--spec <file>', 'spec of the quantized layers (recorded in merged files; needed for a float model to quantize it)')
    .option('--tokenizer <path>', 'tokenizer file, when not found with the model')
    .option('--adapter <dir>', 'merge this adapter first')
    .option('--float-type <t>', 'GGUF float layers: f32 (exact, default) | f16 (needs --lossy)', 'f32')
    .option('--int-zeros', 'GPTQ: standard packed integer zeros (exact only for an unmerged GPTQ base; refused otherwise unless --lossy)')
    .option('--lossy', 'allow an inexact conversion and report the error it introduces')
    .option('--name <s>', 'model name recorded in the file')
    .action(async (o: Record<string, string | boolean | undefined>) => {
      const format = o.format as ExportFormat;
      if (!EXPORT_FORMATS.includes(format)) throw new QaloraError(`--format ${format}: expected ${EXPORT_FORMATS.join(', ')}`);
      const opened = await openForRun({
        model: o.model as string, tokenizer: o.tokenizer as string | undefined, spec: o.spec as string | undefined,
        adapter: o.adapter as string | undefined,
      });
      let weights = opened.model.weights;
      if (o.adapter) {
        const { mergeModel } = await import('./merge.ts');
        weights = (await mergeModel(opened.model)).weights;
      }
      const r = exportModel(format, o.out as string, weights, {
        tokenizer: opened.tokenizer, tokenizerPath: tokenizerSource(o.model as string, o.tokenizer as string | undefined),
        spec: opened.model.spec, lossy: Boolean(o.lossy), intZeros: Boolean(o.intZeros), floatType: o.floatType as 'f32' | 'f16', name: o.name as string | undefined,
      });
      process.stdout.write(r.summary + '\n');
    });
}
