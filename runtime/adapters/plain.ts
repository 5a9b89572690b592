// A QA-LoRA adapter is a plain LoRA in disguise: s·B·A·pool(x) = s·B·A′·x, where A′ [r, in] repeats each column
// of A [r, in/g] over its group's g inputs, times the pooling constant c (poolScale: 1/g mean, 1 sum, L/g PEFT).
// Expanding costs one float rounding per element (c·A; none when c is a power of two). Folding back is exact
// when A′ is constant within each group, as expansion makes it; any other plain LoRA asks for an update that
// varies inside a group, which the INT-b base's QA-LoRA layers cannot apply, and is refused naming its tensor.
import { poolScale, PROJECTIONS, type Pool } from '../../dsl/resolved.ts';
import { QaloraError } from '../errors.ts';
import { hfToMetaRows, metaToHfRows } from '../formats/hf.ts';
import type { Adapter, AdapterSet, LlamaConfig, LlamaWeights, ProjectionName } from '../model/types.ts';

/** How a layer's inputs are grouped and pooled. */
export interface GroupLayout {
  in: number;
  group: number;
  pool: Pool;
}

/** A′ = c·factor·A with each column repeated over its group ([r, in/g] → [r, in]). */
export function expandA(ad: Adapter, lay: GroupLayout, factor = 1): Float32Array {
  const { in: inF, group: g } = lay;
  const L = inF / g;
  if (ad.a.length !== ad.rank * L) throw new QaloraError(`A has ${ad.a.length} values, expected rank·in/g = ${ad.rank}·${L}`);
  const c = poolScale(lay.pool, g, inF) * factor;
  const out = new Float32Array(ad.rank * inF);
  for (let r = 0; r < ad.rank; r++) {
    for (let k = 0; k < L; k++) out.fill(ad.a[r * L + k] * c, r * inF + k * g, r * inF + (k + 1) * g);
  }
  return out;
}

/**
 * A from A′: each group's (common) value divided by c. Values within a group may differ by float noise
 * (an expansion computed elsewhere); anything larger means the adapter is not a QA-LoRA adapter.
 */
export function foldA(ad: Adapter, lay: GroupLayout, where: string): Float32Array {
  const { in: inF, group: g } = lay;
  const L = inF / g;
  if (ad.a.length !== ad.rank * inF) throw new QaloraError(`${where}: has ${ad.a.length / ad.rank} columns, the base layer has ${inF} inputs`);
  const c = poolScale(lay.pool, g, inF);
  const a = new Float32Array(ad.rank * L);
  for (let r = 0; r < ad.rank; r++) {
    const row = ad.a.subarray(r * inF, (r + 1) * inF);
    let rowMax = 0;
    for (const v of row) rowMax = Math.max(rowMax, Math.abs(v));
    const tol = 1e-6 * rowMax;
    for (let k = 0; k < L; k++) {
      const grp = row.subarray(k * g, (k + 1) * g);
      let sum = 0, lo = Infinity, hi = -Infinity;
      for (const v of grp) { sum += v; lo = Math.min(lo, v); hi = Math.max(hi, v); }
      if (hi - lo > tol) {
        throw new QaloraError(
          `${where}: row ${r}, columns ${k * g}..${(k + 1) * g - 1} (one group of ${g} inputs of the INT-b base) differ by ${(hi - lo).toExponential(3)} ` +
          `(row max ${rowMax.toExponential(3)}): this plain LoRA changes the weights within a quantization group, which a QA-LoRA layer cannot apply. ` +
          'Serve it where the base is not quantized in groups (llama.cpp on the GGUF base), or merge it into the float model and quantize again',
        );
      }
      a[r * L + k] = sum / g / c;
    }
  }
  return a;
}

export type RowOrder = 'meta' | 'hf';

/**
 * q and k outputs are permuted between llama.cpp/Meta (RoPE on adjacent pairs, our layout) and Hugging Face
 * (rotate-half), so lora_B's q/k rows follow the base they are meant for: GGUF files use Meta, PEFT plain LoRA HF.
 */
export function reorderQk(set: AdapterSet, c: LlamaConfig, from: RowOrder, to: RowOrder): AdapterSet {
  if (from === to) return set;
  const permute = to === 'hf' ? metaToHfRows : hfToMetaRows;
  return set.map((block) => {
    const out = { ...block };
    for (const [p, heads] of [['q', c.heads], ['k', c.kvHeads]] as const) {
      const ad = block[p];
      if (ad) out[p] = { ...ad, b: permute(ad.b, heads, ad.rank) };
    }
    return out;
  });
}

/** Every adapter of the set expanded to plain LoRA form (rank and alpha unchanged, so s is unchanged). */
export function expandAdapters(set: AdapterSet, layout: (l: number, p: ProjectionName) => GroupLayout): AdapterSet {
  return set.map((block, l) => {
    const out: AdapterSet[number] = {};
    for (const p of PROJECTIONS) {
      const ad = block?.[p];
      if (!ad || ad.rank === 0) continue;
      try {
        out[p] = { ...ad, a: expandA(ad, layout(l, p)) };
      } catch (e) {
        throw new QaloraError(`adapter layers.${l}.${p}: ${(e as Error).message}`);
      }
    }
    return out;
  });
}

/** Plain LoRA adapters folded into QA-LoRA adapters of the base's quantized layers; `tensor` names A′ in messages. */
export function foldAdapters(set: AdapterSet, weights: LlamaWeights, tensor: (l: number, p: ProjectionName) => string): AdapterSet {
  if (set.length > weights.blocks.length) throw new QaloraError(`the adapter has block ${set.length - 1}, the base has ${weights.blocks.length} blocks`);
  return weights.blocks.map((blk, l) => {
    const out: AdapterSet[number] = {};
    for (const p of PROJECTIONS) {
      const ad = set[l]?.[p];
      if (!ad) continue;
      const lin = blk.proj[p];
      const where = tensor(l, p);
      if (lin.kind !== 'quant') throw new QaloraError(`${where}: layers.${l}.${p} of the base is float, not a QA-LoRA layer (give the spec the base was quantized with)`);
      if (ad.b.length !== lin.out * ad.rank) throw new QaloraError(`${where}: lora_B has ${ad.b.length / ad.rank} rows, the base's ${p}_proj has ${lin.out} outputs`);
      out[p] = { ...ad, a: foldA(ad, { in: lin.in, group: lin.settings.group, pool: lin.settings.pool }, where) };
    }
    return out;
  });
}
