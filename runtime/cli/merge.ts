// `qalora merge`: fold a QA-LoRA adapter into the base's per-group offsets β; q and α are copied bit for bit,
// so the merged model is still INT-b. Writes our quantized-base safetensors with the spec and tokenizer recorded.
import type { Command } from 'commander';
import { resolve } from 'node:path';
import { loadPeftAdapter } from '../adapters/peft.ts';
import { QaloraError } from '../errors.ts';
import { mergeAdapters, kernelMerger, type MergeReport } from '../merge.ts';
import { saveQuantizedBase } from '../model/basefile.ts';
import type { LlamaModel } from '../model/llama.ts';
import type { AdapterSet, LlamaWeights } from '../model/types.ts';
import { loadNativeOps } from '../model/native-ops.ts';
import { META_SPEC, META_TOKENIZER, openForRun, tokenizerSource } from '../train/setup.ts';
import { requantizeOption, tablesOption } from './options.ts';
import type { TableType } from '../../dsl/resolved.ts';
import { announceImpliedSpec, reportPeakMemory } from './report.ts';
import { detectFormat } from '../formats/load.ts';

/** Merges a model's adapters with its spec's native merge kernels. */
export async function mergeModel(model: LlamaModel, adapters: AdapterSet = model.adapters): Promise<{ weights: LlamaWeights; report: MergeReport }> {
  if (!model.spec) throw new QaloraError('merge needs a QA-LoRA model (a spec); this model is float');
  const native = await loadNativeOps(model.spec, model.backend);
  return mergeAdapters(model.weights, adapters, kernelMerger({ [model.backend]: native.kernels } as never, model.backend));
}

export function saveMerged(path: string, weights: LlamaWeights, model: LlamaModel, tokenizer?: string, extra: Record<string, string> = {}): void {
  const md: Record<string, string> = { ...extra, [META_SPEC]: JSON.stringify(model.spec) };
  if (tokenizer) md[META_TOKENIZER] = resolve(tokenizer);
  saveQuantizedBase(path, weights, md);
}

export function register(program: Command): void {
  program
    .command('merge')
    .description('fold a QA-LoRA adapter into the INT-b base (β += s·c·B·A); q and α stay bit-identical')
    .requiredOption('--model <path>', 'base model the adapter was trained on')
    .requiredOption('--adapter <dir>', 'PEFT adapter directory (e.g. RUN/adapter)')
    .requiredOption('--out <file.safetensors>', 'merged model (qalora quantized-base safetensors)')
    .option('--spec <file>', 'the spec the adapter was trained with')
    .option('--tokenizer <path>', 'tokenizer file, when not found with the model')
    .option('--backend <name>', 'cpu (default) | cuda | emu', 'cpu')
    .addOption(requantizeOption())
    .addOption(tablesOption())
    .action(async (o: { model: string; adapter: string; out: string; spec?: string; tokenizer?: string; backend: 'cpu'; requantize?: boolean; tables?: TableType }) => {
      if (!o.out.endsWith('.safetensors')) throw new QaloraError(`--out ${o.out}: the merged model is a .safetensors file`);
      const opened = await openForRun({ model: o.model, tokenizer: o.tokenizer, spec: o.spec, backend: o.backend, requantize: o.requantize, inferred: { rank: 0 }, tables: o.tables });
      announceImpliedSpec(opened.impliedSpec);
      const info = loadPeftAdapter(o.adapter, { model: opened.model.config });
      if (info.kind !== 'qalora') throw new QaloraError(`${o.adapter}: a plain LoRA adapter cannot merge into an INT-b base without re-quantizing; merge it into a float model instead`);
      const t0 = performance.now();
      const { weights, report } = await mergeModel(opened.model, info.adapters);
      // The merged file records where its tokenizer is: a tokenizer file, or the GGUF model that carries one.
      const src = tokenizerSource(o.model, o.tokenizer);
      const carriesTokenizer = src === o.model && detectFormat(o.model) === 'gguf';
      saveMerged(o.out, weights, opened.model, src && (src !== o.model || carriesTokenizer) ? src : o.tokenizer, { merged_adapter: resolve(o.adapter) });
      process.stdout.write(
        `merged ${report.quant} QA-LoRA layers in ${((performance.now() - t0) / 1000).toFixed(2)} s (largest offset change ${report.maxShift.toExponential(3)}); ` +
          (report.fp16Rounding > 0 ? `fp16 scales: β' rounded to fp16 once, largest error ${report.fp16Rounding.toExponential(3)} against the exact merge; ` : '') +
          `q and α unchanged → ${o.out}\n`,
      );
      reportPeakMemory();
    });
}
