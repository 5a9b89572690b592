// The trainable parameters of an adapter set as a flat, stably ordered list (block, projection, A then B), so
// the optimizer, gradient accumulation, clipping and checkpoints all address the same tensors the same way.
import { PROJECTIONS } from '../../dsl/resolved.ts';
import type { AdapterSet, ProjectionName } from '../model/types.ts';

export interface ParamRef {
  /** e.g. 'layers.3.q.a' — also the tensor name in optimizer checkpoints. */
  key: string;
  block: number;
  proj: ProjectionName;
  which: 'a' | 'b';
  data: Float32Array;
}

export function paramList(set: AdapterSet): ParamRef[] {
  const out: ParamRef[] = [];
  set.forEach((block, i) => {
    for (const p of PROJECTIONS) {
      const ad = block?.[p];
      if (!ad || ad.rank === 0) continue;
      out.push({ key: `layers.${i}.${p}.a`, block: i, proj: p, which: 'a', data: ad.a });
      out.push({ key: `layers.${i}.${p}.b`, block: i, proj: p, which: 'b', data: ad.b });
    }
  });
  return out;
}

/** The same list's arrays in a gradient set of the same structure (throws on a structural mismatch). */
export function alignedGrads(params: ParamRef[], grads: AdapterSet): Float32Array[] {
  return params.map((p) => {
    const g = grads[p.block]?.[p.proj]?.[p.which];
    if (!g || g.length !== p.data.length) {
      throw new Error(`gradient for ${p.key} is missing or has ${g?.length} elements, expected ${p.data.length}`);
    }
    return g;
  });
}

/** sqrt(Σ g²) over all tensors, accumulated in float64. */
export function globalNorm(tensors: Float32Array[]): number {
  let s = 0;
  for (const t of tensors) for (let i = 0; i < t.length; i++) s += t[i] * t[i];
  return Math.sqrt(s);
}

export function cloneAdapters(set: AdapterSet): AdapterSet {
  return set.map((block) => {
    const o: AdapterSet[number] = {};
    for (const [k, ad] of Object.entries(block ?? {})) {
      if (ad) o[k as ProjectionName] = { rank: ad.rank, alpha: ad.alpha, a: ad.a.slice(), b: ad.b.slice() };
    }
    return o;
  });
}
