// Adapter sets for a model: fresh ones (A Xavier-uniform, seeded; B zeros — the reference code's init, so the
// fine-tune starts exactly at the base model) and checks that given ones fit the model's quant layers.
import { PROJECTIONS } from '../../dsl/resolved.ts';
import type { AdapterSet, LlamaWeights, QuantLinear } from './types.ts';
import { splitmix32, uniformStream } from '../random.ts';
import { QaloraError } from '../errors.ts';

export function initAdapters(weights: LlamaWeights, seed = 0): AdapterSet {
  return weights.blocks.map((blk, l) => {
    const set: AdapterSet[number] = {};
    PROJECTIONS.forEach((p, pi) => {
      const lin = blk.proj[p];
      if (lin.kind !== 'quant' || lin.settings.rank <= 0) return;
      const { rank, alpha, group } = lin.settings, groups = lin.in / group;
      const a = new Float32Array(rank * groups);
      const bound = Math.sqrt(6 / (groups + rank));
      const u = uniformStream(splitmix32((seed >>> 0) ^ splitmix32(l * 8 + pi + 1)));
      for (let i = 0; i < a.length; i++) a[i] = (2 * u() - 1) * bound;
      set[p] = { rank, alpha, a, b: new Float32Array(lin.out * rank) };
    });
    return set;
  });
}

/** Throws naming the first adapter that does not fit its layer (missing layers get no adapter). */
export function checkAdapters(weights: LlamaWeights, adapters: AdapterSet): void {
  if (adapters.length !== weights.blocks.length) throw new QaloraError(`adapters cover ${adapters.length} blocks, the model has ${weights.blocks.length}`);
  adapters.forEach((set, l) => {
    for (const p of PROJECTIONS) {
      const ad = set?.[p];
      if (!ad) continue;
      const lin = weights.blocks[l].proj[p];
      const where = `adapter layers.${l}.${p}`;
      if (lin.kind !== 'quant') throw new QaloraError(`${where}: the layer is float, not a QA-LoRA layer (quantize the model with the adapter's spec: --spec)`);
      const groups = lin.in / (lin as QuantLinear).settings.group;
      if (ad.a.length !== ad.rank * groups) throw new QaloraError(`${where}: A has ${ad.a.length} values, expected rank·in/g = ${ad.rank}·${groups}`);
      if (ad.b.length !== lin.out * ad.rank) throw new QaloraError(`${where}: B has ${ad.b.length} values, expected out·rank = ${lin.out}·${ad.rank}`);
    }
  });
}
