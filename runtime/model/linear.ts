// One linear layer of the model, float or QA-LoRA: forward y = x·Wᵀ (+ adapter) and backward (dx, and dA/dB
// for a quant layer with an adapter). Float layers run the core GEMM; quant layers their specialization's
// kernels, with fp16/bf16 activations converted at the boundary (the model keeps fp32 between layers).
import { poolScale } from '../../dsl/resolved.ts';
import type { Adapter, Linear } from './types.ts';
import { specializationId, type KernelLayerArgs, type NativeOps, type SpecKernels } from './native-ops.ts';
import type { Scratch } from './scratch.ts';
import { QaloraError } from '../errors.ts';

const NO_GRAD = new Float32Array(0);

export interface LinearCall {
  adapter?: Adapter;
  training: boolean;
  seed: number;
  /** The CPU GEMV's int8 activation mode (inference only; see LayerCallArgs.int8Activations). */
  int8?: boolean;
}

export class LinearOp {
  private readonly kernels?: SpecKernels;

  constructor(readonly lin: Linear, private readonly native: NativeOps, private readonly scratch: Scratch, readonly name: string) {
    if (lin.kind === 'quant') {
      const id = specializationId(lin.settings);
      this.kernels = native.kernels[id];
      if (!this.kernels) throw new QaloraError(`${name}: no ${native.backend} kernels for specialization ${id}; is the layer in the spec?`);
    }
  }

  forward(x: Float32Array, y: Float32Array, m: number, call: LinearCall): void {
    const lin = this.lin;
    if (lin.kind === 'float') {
      this.native.core.gemm(x, lin.w, y, m, lin.out, lin.in, false, true, false);
      return;
    }
    const args = this.args(m, call);
    if (lin.settings.dtype === 'fp32') {
      this.kernels!.forward(args, x, y);
      return;
    }
    const xh = this.toHalf(x, 'lin.xh');
    const yh = this.scratch.h('lin.yh', m * lin.out);
    this.kernels!.forward(args, xh, yh);
    this.fromHalf(yh, y);
  }

  /** dx = dy·W (+ adapter path), written or (accumulate) added; dA/dB written into grad when it is given. */
  backward(x: Float32Array, dy: Float32Array, dx: Float32Array, m: number, call: LinearCall, accumulate: boolean, grad?: { a: Float32Array; b: Float32Array }): void {
    const lin = this.lin;
    if (lin.kind === 'float') {
      this.native.core.gemm(dy, lin.w, dx, m, lin.in, lin.out, false, false, accumulate);
      return;
    }
    const args = this.args(m, call);
    const gA = grad && call.adapter ? grad.a : NO_GRAD;
    const gB = grad && call.adapter ? grad.b : NO_GRAD;
    const target = accumulate ? this.scratch.f('lin.dx', m * lin.in) : dx;
    if (lin.settings.dtype === 'fp32') {
      this.kernels!.backward(args, x, dy, target, gA, gB);
    } else {
      const xh = this.toHalf(x, 'lin.xh');
      const dyh = this.toHalf(dy, 'lin.dyh');
      const dxh = this.scratch.h('lin.dxh', m * lin.in);
      this.kernels!.backward(args, xh, dyh, dxh, gA, gB);
      this.fromHalf(dxh, target);
    }
    if (accumulate) this.native.core.add_inplace(dx, target, dx.length);
  }

  private args(m: number, call: LinearCall): KernelLayerArgs {
    const lin = this.lin;
    if (lin.kind !== 'quant') throw new Error('unreachable');
    const s = lin.settings;
    const ad = call.adapter && call.adapter.rank > 0 ? call.adapter : undefined;
    return {
      qweight: lin.qweight, alpha: lin.alpha, beta: lin.beta,
      loraA: ad?.a, loraB: ad?.b,
      m, in: lin.in, out: lin.out,
      rank: ad ? ad.rank : 0,
      scale: ad ? ad.alpha / ad.rank : 0,
      poolScale: poolScale(s.pool, s.group, lin.in),
      dropout: s.dropout,
      training: call.training,
      seed: call.seed,
      int8Activations: call.int8 === true,
    };
  }

  private get bf16(): boolean {
    return this.lin.kind === 'quant' && this.lin.settings.dtype === 'bf16';
  }

  private toHalf(x: Float32Array, name: string): Uint16Array {
    const h = this.scratch.h(name, x.length);
    if (this.bf16) this.native.core.f32_to_bf16(x, h, x.length);
    else this.native.core.f32_to_f16(x, h, x.length);
    return h;
  }

  private fromHalf(h: Uint16Array, y: Float32Array): void {
    if (this.bf16) this.native.core.bf16_to_f32(h, y, y.length);
    else this.native.core.f16_to_f32(h, y, y.length);
  }
}
