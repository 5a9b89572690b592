// AdamW (decoupled weight decay, PyTorch's update rule) over the adapters only, with fp32 moment estimates.
// The arithmetic is done in float64 per element and stored in float32, so a run and its resumption agree bit
// for bit given the same states.
import type { ParamRef } from './params.ts';

export interface AdamWOptions {
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
}

export const ADAMW_DEFAULTS: AdamWOptions = { beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0 };

export class AdamW {
  readonly m: Float32Array[];
  readonly v: Float32Array[];
  /** Updates taken so far (bias correction uses it). */
  t = 0;

  constructor(readonly params: ParamRef[], readonly opts: AdamWOptions = ADAMW_DEFAULTS) {
    this.m = params.map((p) => new Float32Array(p.data.length));
    this.v = params.map((p) => new Float32Array(p.data.length));
  }

  /** One update with gradients `grads` (aligned with params) multiplied by `gradScale` (clipping, 1/count). */
  step(grads: Float32Array[], lr: number, gradScale = 1): void {
    this.t++;
    const { beta1, beta2, eps, weightDecay } = this.opts;
    const bc1 = 1 - beta1 ** this.t, bc2 = 1 - beta2 ** this.t;
    const decay = 1 - lr * weightDecay;
    for (let k = 0; k < this.params.length; k++) {
      const p = this.params[k].data, g = grads[k], m = this.m[k], v = this.v[k];
      for (let i = 0; i < p.length; i++) {
        const gi = g[i] * gradScale;
        const mi = (m[i] = beta1 * m[i] + (1 - beta1) * gi);
        const vi = (v[i] = beta2 * v[i] + (1 - beta2) * gi * gi);
        p[i] = p[i] * decay - (lr * (mi / bc1)) / (Math.sqrt(vi / bc2) + eps);
      }
    }
  }
}
