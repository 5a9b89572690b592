// `qalora export`: a model (typically merged) to GGUF for llama.cpp, GPTQ with float zeros, or our safetensors;
// or an adapter as a plain LoRA (PEFT directory or llama.cpp LoRA GGUF) to serve unmerged on the exported base.
import type { Command } from 'commander';
import { existsSync } from 'node:fs';
import { loadPeftAdapter } from '../adapters/peft.ts';
import { QaloraError } from '../errors.ts';
import { exportModel, EXPORT_FORMATS, type ExportFormat } from '../export/index.ts';
import { exportLora, LORA_FORMATS, type LoraFormat } from '../export/lora.ts';
import { openForRun, tokenizerSource } from '../train/setup.ts';
import { requantizeOption, tablesOption } from './options.ts';
import type { TableType } from '../../dsl/resolved.ts';
import { announceImpliedSpec, reportPeakMemory } from './report.ts';

const FORMATS = [...EXPORT_FORMATS, ...LORA_FORMATS];

/** `--format lora|gguf-lora`: the adapter alone; the base (when given) supplies head counts and shape checks. */
async function exportAdapter(o: Record<string, string | boolean | undefined>): Promise<void> {
  if (!o.adapter) throw new QaloraError(`--format ${o.format} exports an adapter: give --adapter DIR`);
  let model;
  const recorded = loadPeftAdapter(o.adapter as string, { warn: () => {} }).baseModel;
  const base = (o.model as string | undefined) ?? (recorded && existsSync(recorded) ? recorded : undefined);
  if (base) {
    const { loadModel } = await import('../formats/load.ts');
    model = (await loadModel(base, { tokenizer: o.tokenizer as string | undefined })).weights.config;
  }
  const src = loadPeftAdapter(o.adapter as string, { model });
  const dtype = o.dtype as 'f32' | 'f16' | 'bf16';
  if (!['f32', 'f16', 'bf16'].includes(dtype)) throw new QaloraError(`--dtype ${dtype}: expected f32, f16 or bf16`);
  const r = exportLora(o.format as LoraFormat, o.out as string, src, { dtype, lossy: Boolean(o.lossy), model, name: o.name as string | undefined });
  process.stdout.write(r.summary + '\n');
}

export function register(program: Command): void {
  program
    .command('export')
    .description('export a model: gguf (Q4_1/Q5_1 blocks for INT-b layers, exact), gptq (float zeros), or safetensors (ours); ' +
      'or an adapter as a plain LoRA: lora (PEFT directory) or gguf-lora (llama.cpp), to serve unmerged on the unmerged base exported as gguf')
    .option('--model <path>', 'model to export (a merged qalora .safetensors, or any loadable checkpoint); with lora/gguf-lora: the base (default: the adapter\'s base_model_name_or_path)')
    .requiredOption('--format <name>', `one of ${FORMATS.join(', ')}`)
    .requiredOption('--out <path>', 'output file (gguf, gguf-lora, safetensors) or directory (gptq, lora)')
    .option('--spec <file>', 'spec of the quantized layers (recorded in merged files; needed for a float model to quantize it)')
    .option('--tokenizer <path>', 'tokenizer file, when not found with the model')
    .option('--adapter <dir>', 'merge this adapter first; with lora/gguf-lora: the QA-LoRA adapter to export')
    .option('--dtype <t>', 'lora/gguf-lora: f32 (default) | f16 | bf16 (needs --lossy; the error is reported)', 'f32')
    .option('--float-type <t>', 'GGUF float layers: f32 (exact, default) | f16 (needs --lossy)', 'f32')
    .option('--int-zeros', 'GPTQ: standard packed integer zeros (exact only for an unmerged GPTQ base; refused otherwise unless --lossy)')
    .option('--lossy', 'allow an inexact conversion and report the error it introduces')
    .option('--name <s>', 'model name recorded in the file')
    .addOption(requantizeOption())
    .addOption(tablesOption())
    .action(async (o: Record<string, string | boolean | undefined>) => {
      if ((LORA_FORMATS as readonly string[]).includes(o.format as string)) return exportAdapter(o);
      const format = o.format as ExportFormat;
      if (!EXPORT_FORMATS.includes(format)) throw new QaloraError(`--format ${format}: expected ${FORMATS.join(', ')}`);
      if (!o.model) throw new QaloraError(`--format ${format} exports a model: give --model`);
      const opened = await openForRun({
        model: o.model as string, tokenizer: o.tokenizer as string | undefined, spec: o.spec as string | undefined,
        adapter: o.adapter as string | undefined, requantize: Boolean(o.requantize), inferred: { rank: 0 }, tables: o.tables as TableType | undefined,
      });
      announceImpliedSpec(opened.impliedSpec);
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
      reportPeakMemory();
    });
}
