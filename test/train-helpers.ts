// A tiny trainable model for trainer tests: logits z = s·B·(A·e_c) for input token t (column c = t mod L), with
// inverted dropout on A's column output keyed by (seed, position) — so an exact resume must replay data order
// and dropout seeds. Gradients are analytic.
import type { TrainModel } from '../runtime/train/evaluate.ts';
import type { AdapterSet } from '../runtime/model/types.ts';

export class ToyModel implements TrainModel {
  adapters: AdapterSet;
  readonly vocab: number;
  readonly cols: number;
  readonly rank: number;
  constructor(vocab = 16, cols = 4, rank = 3, readonly dropout = 0.2) {
    this.vocab = vocab;
    this.cols = cols;
    this.rank = rank;
    const a = new Float32Array(rank * cols), b = new Float32Array(vocab * rank);
    let s = 12345;
    for (let i = 0; i < a.length; i++) { s = (s * 1103515245 + 12345) >>> 0; a[i] = (s / 2 ** 32 - 0.5) * 0.5; }
    this.adapters = [{ q: { rank, alpha: 2 * rank, a, b } }];
  }

  private keep(seed: number, pos: number, r: number): boolean {
    let h = (seed ^ Math.imul(pos + 1, 0x9e3779b1) ^ Math.imul(r + 7, 0x85ebca6b)) >>> 0;
    h = Math.imul(h ^ (h >>> 16), 0x7feb352d) >>> 0;
    h = Math.imul(h ^ (h >>> 15), 0x846ca68b) >>> 0;
    return ((h ^ (h >>> 16)) >>> 0) / 2 ** 32 >= this.dropout;
  }

  private run(tokens: Int32Array, targets: Int32Array, mask: Uint8Array | undefined, training: boolean, seed: number, grads: boolean) {
    const ad = this.adapters[0].q!;
    const s = ad.alpha / ad.rank, R = this.rank, V = this.vocab, C = this.cols;
    const gA = new Float32Array(ad.a.length), gB = new Float32Array(ad.b.length);
    let loss = 0, count = 0;
    const h = new Float64Array(R), z = new Float64Array(V);
    for (let i = 0; i < tokens.length; i++) {
      if (mask && !mask[i]) continue;
      const c = tokens[i] % C;
      for (let r = 0; r < R; r++) {
        const d = training ? (this.keep(seed, i, r) ? 1 / (1 - this.dropout) : 0) : 1;
        h[r] = ad.a[r * C + c] * d;
      }
      let mx = -Infinity;
      for (let v = 0; v < V; v++) {
        let acc = 0;
        for (let r = 0; r < R; r++) acc += ad.b[v * R + r] * h[r];
        z[v] = s * acc;
        mx = Math.max(mx, z[v]);
      }
      let se = 0;
      for (let v = 0; v < V; v++) se += Math.exp(z[v] - mx);
      loss += Math.log(se) + mx - z[targets[i]];
      count++;
      if (!grads) continue;
      for (let v = 0; v < V; v++) {
        const dz = Math.exp(z[v] - mx) / se - (v === targets[i] ? 1 : 0);
        for (let r = 0; r < R; r++) {
          gB[v * R + r] += s * dz * h[r];
          const d = training ? (this.keep(seed, i, r) ? 1 / (1 - this.dropout) : 0) : 1;
          gA[r * C + c] += s * dz * ad.b[v * R + r] * d;
        }
      }
    }
    return { loss, count, grads: [{ q: { rank: R, alpha: ad.alpha, a: gA, b: gB } }] as AdapterSet };
  }

  loss(tokens: Int32Array, targets: Int32Array, _b: number, _t: number, opts: { mask?: Uint8Array } = {}) {
    const r = this.run(tokens, targets, opts.mask, false, 0, false);
    return { loss: r.loss, count: r.count };
  }

  lossAndGrad(tokens: Int32Array, targets: Int32Array, _b: number, _t: number, opts: { mask?: Uint8Array; training?: boolean; seed?: number } = {}) {
    return this.run(tokens, targets, opts.mask, opts.training ?? false, opts.seed ?? 0, true);
  }
}
