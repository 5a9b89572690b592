// AdamW whose moments live where the adapters are trained (a GPU backend's memory): one adamw_update over the
// flat parameters per step, the host optimizer's arithmetic (templates/core/optim.cpp). The host AdamW keeps the
// step count and, after pull(), the moments, so checkpoints and resumption work as on the CPU.
import type { BackendTraining } from '../model/llama.ts';
import type { F32 } from '../model/memory.ts';
import type { AdamW } from './adamw.ts';

export class BackendAdamW {
  private readonly m: F32;
  private readonly v: F32;

  constructor(private readonly on: BackendTraining, private readonly host: AdamW) {
    this.m = on.mem.f32(on.params.length);
    this.v = on.mem.f32(on.params.length);
    on.mem.write(this.m, flatten(host.m, on.params.length));
    on.mem.write(this.v, flatten(host.v, on.params.length));
  }

  /** One update with the flat gradients scaled by gradScale (clipping, 1/count). */
  step(grads: F32, lr: number, gradScale = 1): void {
    const h = this.host, { beta1, beta2, eps, weightDecay } = h.opts;
    h.t++;
    this.on.core.adamw_update(this.on.params, grads, this.m, this.v, this.on.params.length, lr, beta1, beta2, eps, 1 - lr * weightDecay, gradScale, 1 - beta1 ** h.t, 1 - beta2 ** h.t);
  }

  /** The moments into the host optimizer's arrays (checkpoints, sync checks). */
  pull(): void {
    unflatten(this.on.mem.read(this.m, new Float32Array(this.on.params.length)), this.host.m);
    unflatten(this.on.mem.read(this.v, new Float32Array(this.on.params.length)), this.host.v);
  }
}

function flatten(parts: Float32Array[], n: number): Float32Array {
  const flat = new Float32Array(n);
  let at = 0;
  for (const p of parts) flat.set(p, (at += p.length) - p.length);
  return flat;
}

function unflatten(flat: Float32Array, parts: Float32Array[]): void {
  let at = 0;
  for (const p of parts) p.set(flat.subarray(at, (at += p.length)));
}
