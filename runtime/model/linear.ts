// One linear layer of the model, float or QA-LoRA: forward y = x·Wᵀ (+ adapter) and backward (dx, and dA/dB
// for a quant layer with an adapter). Float layers run the core GEMM; quant layers their specialization's
// kernels, with fp16/bf16 activations cast at the boundary on the backend (the model keeps fp32 between layers).
// The weights are the backend's (Memory.resident): on a GPU they were uploaded once, when the op was built.
import { poolScale } from '../../dsl/resolved.ts';
import type { HalfTable, Linear } from './types.ts';
import { specializationId, type KernelLayerArgs, type NativeOps, type SpecKernels } from './native-ops.ts';
import { Grown, type F32, type Memory, type U16, type U32 } from './memory.ts';
import { QaloraError } from '../errors.ts';

/** An adapter as the kernels take it: A [rank, in/g] and B [out, rank] in the backend's memory. */
export interface AdapterTensors {
  rank: number;
  alpha: number;
  a: F32;
  b: F32;
}

export interface LinearCall {
  adapter?: AdapterTensors;
  training: boolean;
  seed: number;
  /** The CPU GEMV's int8 activation mode (inference only; see LayerCallArgs.int8Activations). */
  int8?: boolean;
}

type Resident =
  | { kind: 'float'; w: F32 }
  | { kind: 'half'; w: U16; bf16: boolean }
  | { kind: 'quant'; qweight: U32; alpha: F32 | U16; beta: F32 | U16 };

/** Work buffers every linear op of a model shares (one op runs at a time): casts, the accumulate target, no-grad. */
export interface LinearWork {
  xh: Grown<U16>;
  yh: Grown<U16>;
  dyh: Grown<U16>;
  dxh: Grown<U16>;
  dxSum: Grown<F32>;
  noGrad: F32;
}

export class LinearOp {
  private readonly kernels?: SpecKernels;
  private readonly resident: Resident;

  static work(mem: Memory): LinearWork {
    const u16 = () => new Grown<U16>(mem, (n) => mem.u16(n));
    return { xh: u16(), yh: u16(), dyh: u16(), dxh: u16(), dxSum: new Grown<F32>(mem, (n) => mem.f32(n)), noGrad: mem.f32(0) };
  }

  /** lin: a layer, or a half token table (the classifier; CPU only: a GPU runner widens the table first). */
  constructor(readonly lin: Linear | HalfTable, private readonly native: NativeOps, mem: Memory, private readonly work: LinearWork, readonly name: string) {
    if (lin.kind === 'half') {
      if (mem.device) throw new QaloraError(`${name}: a ${lin.dtype} table runs on the CPU backend only (widen it for ${native.backend})`);
      this.resident = { kind: 'half', w: mem.resident(lin.data), bf16: lin.dtype === 'bf16' };
    } else if (lin.kind === 'quant') {
      const id = specializationId(lin.settings);
      this.kernels = native.kernels[id];
      if (!this.kernels) throw new QaloraError(`${name}: no ${native.backend} kernels for specialization ${id}; is the layer in the spec?`);
      this.resident = { kind: 'quant', qweight: mem.resident(lin.qweight), alpha: mem.resident(lin.alpha), beta: mem.resident(lin.beta) };
    } else {
      this.resident = { kind: 'float', w: mem.resident(lin.w) };
    }
  }

  forward(x: F32, y: F32, m: number, call: LinearCall): void {
    const lin = this.lin, r = this.resident;
    if (r.kind === 'float') {
      this.native.core.gemm(x, r.w, y, m, lin.out, lin.in, false, true, false);
      return;
    }
    if (r.kind === 'half') {
      this.native.core.gemm_half(x, r.w, y, m, lin.out, lin.in, true, r.bf16, false);
      return;
    }
    const args = this.args(m, call);
    if (!this.halfActs) {
      this.kernels!.forward(args, x, y);
      return;
    }
    const yh = this.work.yh.get(m * lin.out);
    this.kernels!.forward(args, this.toHalf(x, this.work.xh), yh);
    this.fromHalf(yh, y);
  }

  /** dx = dy·W (+ adapter path), written or (accumulate) added; dA/dB written into grad when it is given. */
  backward(x: F32, dy: F32, dx: F32, m: number, call: LinearCall, accumulate: boolean, grad?: { a: F32; b: F32 }): void {
    const lin = this.lin, r = this.resident;
    if (r.kind === 'float') {
      this.native.core.gemm(dy, r.w, dx, m, lin.in, lin.out, false, false, accumulate);
      return;
    }
    if (r.kind === 'half') {
      this.native.core.gemm_half(dy, r.w, dx, m, lin.in, lin.out, false, r.bf16, accumulate);
      return;
    }
    const args = this.args(m, call);
    const gA = grad && call.adapter ? grad.a : this.work.noGrad;
    const gB = grad && call.adapter ? grad.b : this.work.noGrad;
    const target = accumulate ? this.work.dxSum.get(m * lin.in) : dx;
    if (!this.halfActs) {
      this.kernels!.backward(args, x, dy, target, gA, gB);
    } else {
      const dxh = this.work.dxh.get(m * lin.in);
      this.kernels!.backward(args, this.toHalf(x, this.work.xh), this.toHalf(dy, this.work.dyh), dxh, gA, gB);
      this.fromHalf(dxh, target);
    }
    if (accumulate) this.native.core.add_inplace(dx, target, m * lin.in);
  }

  private args(m: number, call: LinearCall): KernelLayerArgs {
    const lin = this.lin, r = this.resident;
    if (lin.kind !== 'quant' || r.kind !== 'quant') throw new Error('unreachable');
    const s = lin.settings;
    const ad = call.adapter && call.adapter.rank > 0 ? call.adapter : undefined;
    return {
      qweight: r.qweight, alpha: r.alpha, beta: r.beta,
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

  private get halfActs(): boolean {
    return this.lin.kind === 'quant' && this.lin.settings.dtype !== 'fp32';
  }

  private get bf16(): boolean {
    return this.lin.kind === 'quant' && this.lin.settings.dtype === 'bf16';
  }

  private toHalf(x: F32, into: Grown<U16>): U16 {
    const h = into.get(x.length);
    if (this.bf16) this.native.core.f32_to_bf16(x, h, x.length);
    else this.native.core.f32_to_f16(x, h, x.length);
    return h;
  }

  private fromHalf(h: U16, y: F32): void {
    if (this.bf16) this.native.core.bf16_to_f32(h, y, y.length);
    else this.native.core.f16_to_f32(h, y, y.length);
  }
}
