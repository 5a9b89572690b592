// Folding adapters into the base. QA-LoRA: β' = β + s·c·(B·A) per (row, group) through the spec's merge kernel —
// q and α are the base's arrays, untouched, so the merged model is still INT-b. Plain LoRA on a float base:
// W' = W + s·B·A (the "LoRA, merge, then quantize" path the paper compares against).
import { poolScale, PROJECTIONS } from '../dsl/resolved.ts';
import { QaloraError } from './errors.ts';
import type { KernelSet } from './native.ts';
import type { Adapter, AdapterSet, BackendName, FloatLinear, Linear, LlamaWeights, ProjectionName, QuantLinear, ScaleArray } from './model/types.ts';
import { newScales, scaleValues, scalesOf, storeScales } from './model/scales.ts';
import { merge as referenceMerge } from './reference/qalora.ts';
import { specializationId } from './model/native-ops.ts';

/** Computes β' for one quantized layer and its adapter, in the layer's scale storage (fp16 scales: rounded once). */
export type BetaMerger = (lin: QuantLinear, ad: Adapter, where: string) => ScaleArray;


function layerArgs(lin: QuantLinear, ad: Adapter) {
  return {
    qweight: lin.qweight, alpha: lin.alpha, beta: lin.beta, loraA: ad.a, loraB: ad.b,
    m: 1, in: lin.in, out: lin.out, rank: ad.rank, scale: ad.alpha / ad.rank,
    poolScale: poolScale(lin.settings.pool, lin.settings.group, lin.in), dropout: 0, training: false, seed: 0,
  };
}

/** The native merge kernel of each layer's specialization (addon.kernels[backend][id].merge). */
export function kernelMerger(kernels: Partial<Record<BackendName, Record<string, KernelSet>>>, backend: BackendName = 'cpu'): BetaMerger {
  return (lin, ad, where) => {
    const id = specializationId(lin.settings);
    const set = kernels[backend]?.[id];
    if (!set) throw new QaloraError(`${where}: no ${backend} kernels for specialization ${id}; was the model built with this spec?`);
    const out = newScales(scalesOf(lin.settings), lin.beta.length);
    set.merge(layerArgs(lin, ad), out);
    return out;
  };
}

/** The float64 reference merge rounded to the scale storage (for tests and machines without the addon). */
export const referenceMerger: BetaMerger = (lin, ad) => {
  const s = lin.settings;
  const args = { ...layerArgs(lin, ad), alpha: scaleValues(lin.alpha), beta: scaleValues(lin.beta) };
  return storeScales(referenceMerge({ ...args, bits: s.bits, group: s.group, pool: s.pool }), scalesOf(s));
};

function checkAdapter(lin: Linear, ad: Adapter, where: string): void {
  const cols = lin.kind === 'quant' ? lin.in / lin.settings.group : lin.in;
  if (ad.a.length !== ad.rank * cols) {
    const kind = lin.kind === 'quant' ? `a QA-LoRA layer pooling ${lin.in} inputs into ${cols}` : `a float layer with ${lin.in} inputs`;
    throw new QaloraError(`${where}: adapter A has ${ad.a.length / ad.rank} columns, but this is ${kind}` +
      (lin.kind === 'quant' && ad.a.length === ad.rank * lin.in ? ' (a plain LoRA adapter cannot merge into an INT-b base exactly)' : ''));
  }
  if (ad.b.length !== ad.rank * lin.out) throw new QaloraError(`${where}: adapter B has ${ad.b.length / ad.rank} rows but the layer has ${lin.out} outputs`);
}

/** W' = W + s·B·A for a float layer, accumulated in float64 per element. */
export function mergeFloatLinear(lin: FloatLinear, ad: Adapter): FloatLinear {
  const { out, in: inF } = lin;
  const s = ad.alpha / ad.rank, R = ad.rank;
  const w = new Float32Array(lin.w);
  const row = new Float64Array(inF);
  for (let o = 0; o < out; o++) {
    row.fill(0);
    for (let r = 0; r < R; r++) {
      const b = ad.b[o * R + r];
      if (b === 0) continue;
      const aRow = r * inF;
      for (let i = 0; i < inF; i++) row[i] += b * ad.a[aRow + i];
    }
    for (let i = 0; i < inF; i++) w[o * inF + i] = lin.w[o * inF + i] + s * row[i];
  }
  return { kind: 'float', out, in: inF, w };
}

export interface MergeReport {
  /** Layers merged, by kind. */
  quant: number;
  float: number;
  /** Largest |β' − β| (quantized layers) or |W' − W| (float layers). */
  maxShift: number;
  /**
   * Layers with fp16 scales: the largest |β'_stored − (β + s·c·B·A)| against the float64 merge — the one fp16
   * rounding of β' (at most half an ulp of β'); 0 when every merged layer has fp32 scales (exact up to fp32).
   */
  fp16Rounding: number;
}

/**
 * A new LlamaWeights with every adapter folded in. Quantized layers share qweight and alpha with the input
 * (bit-identical by construction) and get a new beta; nothing else is copied.
 */
export function mergeAdapters(w: LlamaWeights, adapters: AdapterSet, merger: BetaMerger = referenceMerger): { weights: LlamaWeights; report: MergeReport } {
  if (adapters.length > w.blocks.length) throw new QaloraError(`adapters for ${adapters.length} blocks but the model has ${w.blocks.length}`);
  const report: MergeReport = { quant: 0, float: 0, maxShift: 0, fp16Rounding: 0 };
  const blocks = w.blocks.map((b, l) => {
    const proj = { ...b.proj };
    for (const p of PROJECTIONS as readonly ProjectionName[]) {
      const ad = adapters[l]?.[p];
      if (!ad || ad.rank === 0) continue;
      const lin = b.proj[p];
      const where = `block ${l} ${p}_proj`;
      checkAdapter(lin, ad, where);
      if (lin.kind === 'quant') {
        const beta = merger(lin, ad, where);
        const before = scaleValues(lin.beta), after = scaleValues(beta);
        for (let i = 0; i < after.length; i++) report.maxShift = Math.max(report.maxShift, Math.abs(after[i] - before[i]));
        if (scalesOf(lin.settings) === 'fp16') {
          const s = lin.settings;
          const exact = referenceMerge({ ...layerArgs(lin, ad), alpha: scaleValues(lin.alpha), beta: before, bits: s.bits, group: s.group, pool: s.pool });
          for (let i = 0; i < after.length; i++) report.fp16Rounding = Math.max(report.fp16Rounding, Math.abs(after[i] - exact[i]));
        }
        proj[p] = { ...lin, beta };
        report.quant++;
      } else {
        const merged = mergeFloatLinear(lin, ad);
        for (let i = 0; i < merged.w.length; i++) report.maxShift = Math.max(report.maxShift, Math.abs(merged.w[i] - lin.w[i]));
        proj[p] = merged;
        report.float++;
      }
    }
    return { ...b, proj };
  });
  return { weights: { ...w, blocks }, report };
}
