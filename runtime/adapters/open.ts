// Any adapter a user may hand us, made into QA-LoRA adapters of a quantized base: a QA-LoRA PEFT directory as
// it is (q/k rows reordered when PEFT made it on a Hugging Face model); a plain LoRA (a PEFT directory without use_qalora, or a llama.cpp LoRA GGUF) folded back into the
// base's groups — exact for the plain LoRA our export writes (A′ constant within each group), refused naming
// the tensor for any other (plain.ts says why).
import { statSync } from 'node:fs';
import type { AdapterSet, LlamaConfig, LlamaWeights, ProjectionName } from '../model/types.ts';
import { ggufLoraName, readGgufLora } from './gguf-lora.ts';
import { loadPeftAdapter, peftKey, WEIGHTS_FILE, type LoadedAdapter } from './peft.ts';
import { foldAdapters, reorderQk, type RowOrder } from './plain.ts';

export type AdapterSource =
  | { format: 'peft'; loaded: LoadedAdapter }
  | { format: 'gguf-lora'; adapters: AdapterSet };

const isFile = (path: string) => {
  try {
    return statSync(path).isFile();
  } catch {
    return false;
  }
};

/**
 * The q/k row order of a PEFT adapter: ours record qalora_pooling and keep the model's (Meta) rows; PEFT's own
 * QA-LoRA files and every plain PEFT LoRA were made on a Hugging Face model, whose q/k rows are rotate-half.
 */
export function peftRowOrder(src: LoadedAdapter): RowOrder {
  return src.kind === 'qalora' && src.config.qalora_pooling !== undefined ? 'meta' : 'hf';
}

/** Reads an adapter (PEFT directory or LoRA GGUF file), checked against the base's shapes when `model` is given. */
export function readAdapter(path: string, opts: { model?: LlamaConfig; warn?: (m: string) => void } = {}): AdapterSource {
  if (isFile(path) || path.endsWith('.gguf')) return { format: 'gguf-lora', adapters: readGgufLora(path, opts.model) };
  return { format: 'peft', loaded: loadPeftAdapter(path, opts) };
}

/** Whether the adapter is plain LoRA (A over all inputs), which must be folded before a QA-LoRA base runs it. */
export function isPlainLora(src: AdapterSource): boolean {
  return src.format === 'gguf-lora' || src.loaded.kind === 'lora';
}

/**
 * The adapter as QA-LoRA adapters of `weights` (a quantized base). A folded plain LoRA (`folded`) has no pooling
 * of its own: it takes each layer's, so only an unfolded QA-LoRA adapter needs its pooling checked. PEFT plain LoRA has q/k rows in the Hugging Face order; GGUF in ours.
 */
export function openAdapterFor(path: string, weights: LlamaWeights, opts: { warn?: (m: string) => void } = {}): LoadedAdapter & { folded: boolean } {
  const c = weights.config;
  const src = readAdapter(path, { model: c, warn: opts.warn });
  if (src.format === 'peft' && src.loaded.kind === 'qalora') {
    return { ...src.loaded, adapters: reorderQk(src.loaded.adapters, c, peftRowOrder(src.loaded), 'meta'), folded: false };
  }
  const [plain, name] = src.format === 'gguf-lora'
    ? [src.adapters, (l: number, p: ProjectionName) => `${path}: '${ggufLoraName(l, p, 'a')}'`]
    : [reorderQk(src.loaded.adapters, c, peftRowOrder(src.loaded), 'meta'), (l: number, p: ProjectionName) => `${path}/${WEIGHTS_FILE}: '${peftKey(l, p, 'A')}'`];
  const adapters = foldAdapters(plain, weights, name);
  const groups: LoadedAdapter['groups'] = {};
  let pool: LoadedAdapter['pool'] = 'mean';
  for (const block of weights.blocks) {
    for (const [p, lin] of Object.entries(block.proj)) {
      if (lin.kind !== 'quant') continue;
      groups[p as ProjectionName] = lin.settings.group;
      pool = lin.settings.pool;
    }
  }
  const base = src.format === 'peft' ? src.loaded : { config: {}, dropout: 0 };
  return { ...base, kind: 'qalora', adapters, groups, pool, folded: true };
}
