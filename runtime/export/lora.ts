// A QA-LoRA adapter exported as the plain LoRA it is in disguise (adapters/plain.ts), for engines that serve one
// base and many unmerged adapters: a PEFT LoRA directory (vLLM, PEFT; q/k rows in the Hugging Face order) or a
// llama.cpp LoRA adapter GGUF (rows in the Meta order of the GGUF base). With the unmerged base exported as
// GGUF, llama.cpp then computes our unmerged model. F32 is exact up to the rounding of c·A; F16/BF16 round
// every value once more, and the report says how much that moves the update s·B·A′.
import { PROJECTIONS } from '../../dsl/resolved.ts';
import { encodeFloats, writeGgufLora, type LoraDType } from '../adapters/gguf-lora.ts';
import { savePeftAdapter, type LoadedAdapter } from '../adapters/peft.ts';
import { peftRowOrder } from '../adapters/open.ts';
import { expandAdapters, reorderQk } from '../adapters/plain.ts';
import { QaloraError } from '../errors.ts';
import type { Adapter, AdapterSet, LlamaConfig } from '../model/types.ts';
import { asF32, tensorOf } from '../safetensors.ts';

export const LORA_FORMATS = ['lora', 'gguf-lora'] as const;
export type LoraFormat = (typeof LORA_FORMATS)[number];

export interface LoraExportOptions {
  dtype?: LoraDType;
  /** Needed for f16/bf16, which are not exact. */
  lossy?: boolean;
  /** The base's config: q/k rows change order between PEFT (HF) and GGUF (Meta) files, per head. */
  model?: LlamaConfig;
  name?: string;
}

export interface LoraExportResult {
  summary: string;
  /** Largest |ΔW error| the file's dtype introduces in s·B·A′ (0 for f32). */
  maxAbsError: number;
  /** Largest relative (Frobenius) error of s·B·A′ over the layers. */
  maxRelError: number;
  /** The plain LoRA as written (q/k rows in our Meta order), before any dtype rounding. */
  adapters: AdapterSet;
}

/** The adapter in plain LoRA form, q/k rows in the Meta order (needs the model's heads when it must reorder). */
export function plainLora(src: LoadedAdapter, model?: LlamaConfig): AdapterSet {
  const expanded = src.kind === 'lora' ? src.adapters : expandAdapters(src.adapters, (l, p) => {
    const ad = src.adapters[l][p]!, g = src.groups[p];
    if (!g) throw new QaloraError(`no group size recorded for ${p}_proj`);
    return { in: (ad.a.length / ad.rank) * g, group: g, pool: src.pool };
  });
  const from = peftRowOrder(src);
  const hasQk = expanded.some((b) => b.q || b.k);
  if (from === 'meta' || !hasQk) return expanded;
  if (!model) throw new QaloraError('this adapter\'s q/k rows are in the Hugging Face order; reordering them needs the head counts: pass --model BASE');
  return reorderQk(expanded, model, from, 'meta');
}

/** Rounds to the dtype and back, and measures what that does to s·B·A′ (computed per group: A′ is constant in each). */
function dtypeError(set: AdapterSet, groups: LoadedAdapter['groups'], dtype: LoraDType): { abs: number; rel: number; where: string } {
  if (dtype === 'f32') return { abs: 0, rel: 0, where: '' };
  const round = (a: Float32Array) => asF32(tensorOf(dtype === 'f16' ? 'F16' : 'BF16', [a.length], encodeFloats(a, dtype)));
  let abs = 0, rel = 0, where = '';
  set.forEach((block, l) => {
    for (const p of PROJECTIONS) {
      const ad = block[p];
      if (!ad) continue;
      const g = groups[p] ?? 1, inF = ad.a.length / ad.rank, L = inF / g, out = ad.b.length / ad.rank;
      const a2 = round(ad.a), b2 = round(ad.b), s = ad.alpha / ad.rank;
      let num = 0, den = 0;
      for (let o = 0; o < out; o++) {
        for (let k = 0; k < L; k++) {
          let d = 0, d2 = 0;
          for (let r = 0; r < ad.rank; r++) {
            d += ad.b[o * ad.rank + r] * ad.a[r * inF + k * g];
            d2 += b2[o * ad.rank + r] * a2[r * inF + k * g];
          }
          const e = s * Math.abs(d2 - d);
          abs = Math.max(abs, e);
          num += e * e;
          den += s * s * d * d;
        }
      }
      const r = den > 0 ? Math.sqrt(num / den) : 0;
      if (r > rel) [rel, where] = [r, `layers.${l}.${p}`];
    }
  });
  return { abs, rel, where };
}

export function exportLora(format: LoraFormat, out: string, src: LoadedAdapter, o: LoraExportOptions = {}): LoraExportResult {
  const dtype = o.dtype ?? 'f32';
  if (dtype !== 'f32' && !o.lossy) throw new QaloraError(`--dtype ${dtype} rounds every value of the adapter; pass --lossy to accept it, the report will give the error`);
  const plain = plainLora(src, o.model);
  // Expanded layers keep their group size in the measure (the update is constant within a group).
  const err = dtypeError(plain, src.kind === 'qalora' ? src.groups : {}, dtype);
  const tensors = plain.reduce((n, b) => n + Object.values(b).filter((ad: Adapter | undefined) => ad && ad.rank > 0).length, 0);
  let summary: string;
  if (format === 'lora') {
    if (!o.model && plain.some((b) => b.q || b.k)) throw new QaloraError('a PEFT LoRA has its q/k rows in the Hugging Face order, which needs the head counts: pass --model BASE');
    const rows = o.model ? reorderQk(plain, o.model, 'meta', 'hf') : plain;
    savePeftAdapter(out, rows, { kind: 'lora', groups: {}, pool: src.pool, dropout: src.dropout, baseModel: src.baseModel }, {}, dtype.toUpperCase() as 'F32' | 'F16' | 'BF16');
    summary = `wrote ${out}/ (PEFT LoRA, ${dtype.toUpperCase()}): ${tensors} adapted layers, lora_A [r, in], q/k rows in the Hugging Face order`;
  } else {
    const r = writeGgufLora(out, plain, { dtype, name: o.name });
    summary = `wrote ${out} (llama.cpp LoRA adapter GGUF, ${dtype.toUpperCase()}, ${(r.bytes / 1024).toFixed(1)} KiB): ${tensors} adapted layers, adapter.lora.alpha ${r.alpha}` +
      (r.rescaled.length ? `\nalpha/rank folded into lora_a (llama.cpp has one alpha per file): ${r.rescaled.join(', ')}` : '');
  }
  summary += dtype === 'f32'
    ? '\nexact: the same update as the QA-LoRA adapter (up to the float rounding of c·A)'
    : `\n${dtype} rounding moves s·B·A′ by at most ${err.abs.toExponential(3)} (relative ${err.rel.toExponential(3)} at ${err.where})`;
  return { summary, maxAbsError: err.abs, maxRelError: err.rel, adapters: plain };
}
