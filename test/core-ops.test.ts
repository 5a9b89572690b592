// Core ops (templates/core) against plain float64 TypeScript: every forward against a direct implementation,
// every backward against central finite differences of that float64 forward (so a backward is checked to be
// the derivative of the right function, not of the native forward).
import { beforeAll, describe, expect, it } from 'vitest';
import { loadCore } from '../runtime/native.ts';
import type { CoreOps } from '../runtime/model/native-ops.ts';
import { f32ToBf16Bits, f32ToF16Bits, f16BitsToF32 } from '../runtime/safetensors.ts';
import { uniformStream } from '../runtime/random.ts';
import { AdamW, ADAMW_DEFAULTS } from '../runtime/train/adamw.ts';
import { globalNorm } from '../runtime/train/params.ts';

let core: CoreOps;
beforeAll(async () => {
  core = (await loadCore()).core as unknown as CoreOps;
});

const rng = uniformStream;
function rand(n: number, seed: number, scale = 1): Float32Array {
  const r = rng(seed);
  return Float32Array.from({ length: n }, () => (2 * r() - 1) * scale);
}
function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}
const f64 = (a: ArrayLike<number>) => Float64Array.from(a as ArrayLike<number>);

/** Σ dy·f(x) differentiated w.r.t. x by central differences of a float64 function. */
function numericGrad(f: (x: Float64Array) => Float64Array, x: Float64Array, dy: ArrayLike<number>, h = 1e-5): Float64Array {
  const g = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const keep = x[i];
    x[i] = keep + h;
    const up = f(x);
    x[i] = keep - h;
    const down = f(x);
    x[i] = keep;
    let s = 0;
    for (let j = 0; j < up.length; j++) s += dy[j] * (up[j] - down[j]);
    g[i] = s / (2 * h);
  }
  return g;
}

// ---- float64 references ----------------------------------------------------------------------------------

function refGemm(a: Float32Array, b: Float32Array, c0: Float32Array, m: number, n: number, k: number, ta: boolean, tb: boolean, acc: boolean): Float64Array {
  const c = new Float64Array(m * n);
  for (let i = 0; i < m; i++)
    for (let j = 0; j < n; j++) {
      let s = acc ? c0[i * n + j] : 0;
      for (let p = 0; p < k; p++) s += (ta ? a[p * m + i] : a[i * k + p]) * (tb ? b[j * k + p] : b[p * n + j]);
      c[i * n + j] = s;
    }
  return c;
}

function refRmsnorm(x: Float64Array, w: Float32Array, rows: number, dim: number, eps: number): Float64Array {
  const y = new Float64Array(rows * dim);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let i = 0; i < dim; i++) ss += x[r * dim + i] ** 2;
    const s = 1 / Math.sqrt(ss / dim + eps);
    for (let i = 0; i < dim; i++) y[r * dim + i] = w[i] * s * x[r * dim + i];
  }
  return y;
}

function refRope(x: Float64Array, pos: Int32Array, rows: number, heads: number, hd: number, theta: number, half: boolean): Float64Array {
  const y = Float64Array.from(x);
  for (let r = 0; r < rows; r++)
    for (let h = 0; h < heads; h++)
      for (let j = 0; j < hd / 2; j++) {
        const ang = pos[r] * theta ** (-(2 * j) / hd);
        const base = (r * heads + h) * hd;
        const i0 = base + (half ? j : 2 * j), i1 = base + (half ? j + hd / 2 : 2 * j + 1);
        y[i0] = x[i0] * Math.cos(ang) - x[i1] * Math.sin(ang);
        y[i1] = x[i0] * Math.sin(ang) + x[i1] * Math.cos(ang);
      }
  return y;
}

interface AttnShape { batch: number; tq: number; tk: number; heads: number; kvHeads: number; hd: number }
/** softmax over keys u ≤ t + tk − tq of q·k/√hd: query t of head h (kv head kh) in batch b. */
function refProbs(q: Float64Array, k: Float64Array, s: AttnShape, b: number, h: number, kh: number, t: number): number[] {
  const { tq, tk, heads, kvHeads, hd } = s;
  const sc: number[] = [];
  for (let u = 0; u <= t + tk - tq; u++) {
    let d = 0;
    for (let i = 0; i < hd; i++) d += q[((b * tq + t) * heads + h) * hd + i] * k[((b * tk + u) * kvHeads + kh) * hd + i];
    sc.push(d / Math.sqrt(hd));
  }
  const mx = Math.max(...sc);
  const e = sc.map((z) => Math.exp(z - mx));
  const sum = e.reduce((a, z) => a + z, 0);
  return e.map((z) => z / sum);
}

function refAttention(q: Float64Array, k: Float64Array, v: Float64Array, s: AttnShape): Float64Array {
  const { batch, tq, tk, heads, kvHeads, hd } = s;
  const out = new Float64Array(batch * tq * heads * hd);
  for (let b = 0; b < batch; b++)
    for (let h = 0; h < heads; h++) {
      const kh = Math.floor(h / (heads / kvHeads));
      for (let t = 0; t < tq; t++) {
        const p = refProbs(q, k, s, b, h, kh, t);
        for (let u = 0; u < p.length; u++)
          for (let i = 0; i < hd; i++) out[((b * tq + t) * heads + h) * hd + i] += p[u] * v[((b * tk + u) * kvHeads + kh) * hd + i];
      }
    }
  return out;
}

/** d(out·dout)/d{q, k, v} of refAttention, written out (P = softmax(S), dS = P∘(dP − rowsum(dP∘P))). */
function refAttentionBackward(q: Float64Array, k: Float64Array, v: Float64Array, dout: ArrayLike<number>, s: AttnShape): { dq: Float64Array; dk: Float64Array; dv: Float64Array } {
  const { batch, tq, tk, heads, kvHeads, hd } = s;
  const dq = new Float64Array(q.length), dk = new Float64Array(k.length), dv = new Float64Array(v.length);
  const qi = (b: number, t: number, h: number) => ((b * tq + t) * heads + h) * hd;
  const ki = (b: number, u: number, h: number) => ((b * tk + u) * kvHeads + h) * hd;
  for (let b = 0; b < batch; b++)
    for (let h = 0; h < heads; h++) {
      const kh = Math.floor(h / (heads / kvHeads));
      for (let t = 0; t < tq; t++) {
        const p = refProbs(q, k, s, b, h, kh, t);
        const dp = p.map((_, u) => {
          let d = 0;
          for (let i = 0; i < hd; i++) d += dout[qi(b, t, h) + i] * v[ki(b, u, kh) + i];
          return d;
        });
        const D = p.reduce((a, pu, u) => a + pu * dp[u], 0);
        for (let u = 0; u < p.length; u++) {
          const ds = (p[u] * (dp[u] - D)) / Math.sqrt(hd);
          for (let i = 0; i < hd; i++) {
            dv[ki(b, u, kh) + i] += p[u] * dout[qi(b, t, h) + i];
            dq[qi(b, t, h) + i] += ds * k[ki(b, u, kh) + i];
            dk[ki(b, u, kh) + i] += ds * q[qi(b, t, h) + i];
          }
        }
      }
    }
  return { dq, dk, dv };
}

const silu = (g: number) => g / (1 + Math.exp(-g));

function refCrossEntropy(logits: Float64Array, targets: Int32Array, n: number, vocab: number): number {
  let total = 0;
  for (let r = 0; r < n; r++) {
    if (targets[r] < 0) continue;
    let mx = -Infinity;
    for (let i = 0; i < vocab; i++) mx = Math.max(mx, logits[r * vocab + i]);
    let s = 0;
    for (let i = 0; i < vocab; i++) s += Math.exp(logits[r * vocab + i] - mx);
    total += mx + Math.log(s) - logits[r * vocab + targets[r]];
  }
  return total;
}

// ---- tests -------------------------------------------------------------------------------------------------

describe('core ops', () => {
  // Both builds of the CPU GEMM engine (QALORA_CPU_ISA is read on every call), across its paths: few rows of
  // x·Wᵀ without packing (m ≤ 16, trans_b), the tiny single-task product and the threaded blocked one.
  for (const isa of ['native', 'portable'])
    it(`gemm (${isa} build): all transpose/accumulate variants, GEMV-like and blocked shapes`, () => {
      const shapes = [[1, 7, 5], [3, 100, 37], [4, 64, 64], [5, 33, 17], [16, 37, 70], [17, 41, 9], [20, 50, 40], [64, 172, 64], [130, 300, 260], [300, 40, 600]];
      const saved = process.env.QALORA_CPU_ISA;
      if (isa === 'portable') process.env.QALORA_CPU_ISA = 'portable';
      try {
        let seed = 1;
        for (const [m, n, k] of shapes)
          for (const ta of [false, true])
            for (const tb of [false, true])
              for (const acc of [false, true]) {
                const a = rand(m * k, seed++), b = rand(k * n, seed++), c0 = rand(m * n, seed++);
                const c = c0.slice();
                core.gemm(a, b, c, m, n, k, ta, tb, acc);
                const want = refGemm(a, b, c0, m, n, k, ta, tb, acc);
                expect(maxAbsDiff(c, want), `m${m} n${n} k${k} ta${ta} tb${tb} acc${acc}`).toBeLessThan(1e-5 * Math.sqrt(k) * 4);
              }
      } finally {
        if (saved === undefined) delete process.env.QALORA_CPU_ISA;
        else process.env.QALORA_CPU_ISA = saved;
      }
    });

  it('embedding gather and scatter-add', () => {
    const vocab = 11, dim = 6, ids = Int32Array.from([3, 0, 10, 3, 7]);
    const table = rand(vocab * dim, 5);
    const out = new Float32Array(ids.length * dim);
    core.embedding_forward(table, ids, out, ids.length, vocab, dim);
    ids.forEach((id, i) => expect(Array.from(out.subarray(i * dim, (i + 1) * dim))).toEqual(Array.from(table.subarray(id * dim, (id + 1) * dim))));
    const dout = rand(ids.length * dim, 6), dtable = rand(vocab * dim, 7), want = f64(dtable);
    ids.forEach((id, i) => { for (let c = 0; c < dim; c++) want[id * dim + c] += dout[i * dim + c]; });
    core.embedding_backward(ids, dout, dtable, ids.length, vocab, dim);
    expect(maxAbsDiff(dtable, want)).toBeLessThan(1e-6);
  });

  it('RMSNorm forward and backward', () => {
    // Rows go eight at a time (a lane each): fewer than eight, a second group that is partial, and a dim that
    // ends inside a block of eight.
    for (const [rows, dim] of [[5, 24], [19, 13], [9, 40]]) {
      const eps = 1e-5;
      const x = rand(rows * dim, 10, 2), w = rand(dim, 11), dy = rand(rows * dim, 12);
      const y = new Float32Array(rows * dim), rstd = new Float32Array(rows), dx = new Float32Array(rows * dim);
      core.rmsnorm_forward(x, w, y, rstd, rows, dim, eps);
      expect(maxAbsDiff(y, refRmsnorm(f64(x), w, rows, dim, eps))).toBeLessThan(2e-6);
      core.rmsnorm_backward(x, w, rstd, dy, dx, rows, dim);
      const num = numericGrad((xx) => refRmsnorm(xx, w, rows, dim, eps), f64(x), dy);
      expect(maxAbsDiff(dx, num)).toBeLessThan(2e-5);
    }
  });

  it('RoPE forward (Meta pairs and HF rotate-half) and backward', () => {
    const heads = 3, hd = 8, theta = 10000;
    // Scattered positions (angles per row), and a batch that repeats them (angles per position, once).
    for (const pos of [Int32Array.from([0, 1, 5, 17, 100, 511]), Int32Array.from([7, 8, 9, 10, 7, 8, 9, 10, 9])])
      for (const half of [false, true]) {
        const rows = pos.length;
        const x = rand(rows * heads * hd, 20), y = x.slice();
        core.rope_forward(y, pos, rows, heads, hd, theta, half);
        expect(maxAbsDiff(y, refRope(f64(x), pos, rows, heads, hd, theta, half))).toBeLessThan(1e-5);
        const dy = rand(rows * heads * hd, 21), dx = dy.slice();
        core.rope_backward(dx, pos, rows, heads, hd, theta, half);
        const num = numericGrad((xx) => refRope(xx, pos, rows, heads, hd, theta, half), f64(x), dy);
        expect(maxAbsDiff(dx, num)).toBeLessThan(1e-5);
      }
    // The layouts differ: a Meta rotation is not an HF one.
    const x = rand(heads * hd, 22), a = x.slice(), b = x.slice(), p = Int32Array.from([3]);
    core.rope_forward(a, p, 1, heads, hd, theta, false);
    core.rope_forward(b, p, 1, heads, hd, theta, true);
    expect(maxAbsDiff(a, b)).toBeGreaterThan(1e-3);
  });

  it('causal GQA attention forward (training and cached-prefix shapes) and backward', () => {
    for (const s of [
      { batch: 2, tq: 5, tk: 5, heads: 4, kvHeads: 2, hd: 4 },
      { batch: 1, tq: 3, tk: 7, heads: 2, kvHeads: 1, hd: 8 },
      { batch: 1, tq: 1, tk: 9, heads: 4, kvHeads: 4, hd: 4 },
    ] satisfies AttnShape[]) {
      const nq = s.batch * s.tq * s.heads * s.hd, nk = s.batch * s.tk * s.kvHeads * s.hd;
      const q = rand(nq, 30), k = rand(nk, 31), v = rand(nk, 32), dout = rand(nq, 33);
      const out = new Float32Array(nq), lse = new Float32Array(s.batch * s.tq * s.heads);
      core.attention_forward(q, k, v, out, lse, s.batch, s.tq, s.tk, s.heads, s.kvHeads, s.hd);
      const label = JSON.stringify(s);
      expect(maxAbsDiff(out, refAttention(f64(q), f64(k), f64(v), s)), label).toBeLessThan(1e-5);
      const dq = new Float32Array(nq), dk = new Float32Array(nk), dv = new Float32Array(nk);
      core.attention_backward(q, k, v, out, lse, dout, dq, dk, dv, s.batch, s.tq, s.tk, s.heads, s.kvHeads, s.hd);
      const Q = f64(q), K = f64(k), V = f64(v);
      expect(maxAbsDiff(dq, numericGrad((x) => refAttention(x, K, V, s), Q, dout)), label).toBeLessThan(2e-5);
      expect(maxAbsDiff(dk, numericGrad((x) => refAttention(Q, x, V, s), K, dout)), label).toBeLessThan(2e-5);
      expect(maxAbsDiff(dv, numericGrad((x) => refAttention(Q, K, x, s), V, dout)), label).toBeLessThan(2e-5);
      // The written-out reference backward used below is the finite differences' gradient too.
      const ref = refAttentionBackward(Q, K, V, dout, s);
      expect(maxAbsDiff(ref.dq, numericGrad((x) => refAttention(x, K, V, s), Q, dout)), label).toBeLessThan(1e-6);
      expect(maxAbsDiff(ref.dk, numericGrad((x) => refAttention(Q, x, V, s), K, dout)), label).toBeLessThan(1e-6);
    }
  });

  it('causal GQA attention in query blocks (prefill and training sizes): forward and backward against the float64 reference', () => {
    // tq ≥ 8 and head_dim a multiple of 8 take the blocked kernels: partial blocks of 32 query rows, key counts
    // that are not a multiple of 8, head sizes of one and a half 16-wide tiles, a cached prefix, GQA.
    for (const s of [
      { batch: 2, tq: 40, tk: 40, heads: 4, kvHeads: 2, hd: 16 },
      { batch: 1, tq: 19, tk: 45, heads: 2, kvHeads: 1, hd: 24 },
      { batch: 1, tq: 70, tk: 70, heads: 2, kvHeads: 2, hd: 64 },
      { batch: 3, tq: 8, tk: 8, heads: 2, kvHeads: 1, hd: 8 },
    ] satisfies AttnShape[]) {
      const nq = s.batch * s.tq * s.heads * s.hd, nk = s.batch * s.tk * s.kvHeads * s.hd;
      const q = rand(nq, 60, 0.6), k = rand(nk, 61, 0.6), v = rand(nk, 62), dout = rand(nq, 63);
      const out = new Float32Array(nq), lse = new Float32Array(s.batch * s.tq * s.heads);
      core.attention_forward(q, k, v, out, lse, s.batch, s.tq, s.tk, s.heads, s.kvHeads, s.hd);
      const label = JSON.stringify(s);
      expect(maxAbsDiff(out, refAttention(f64(q), f64(k), f64(v), s)), label).toBeLessThan(1e-5);
      const dq = new Float32Array(nq), dk = new Float32Array(nk).fill(7), dv = new Float32Array(nk).fill(7);
      core.attention_backward(q, k, v, out, lse, dout, dq, dk, dv, s.batch, s.tq, s.tk, s.heads, s.kvHeads, s.hd);
      const ref = refAttentionBackward(f64(q), f64(k), f64(v), dout, s);
      expect(maxAbsDiff(dq, ref.dq), `${label} dq`).toBeLessThan(2e-5);
      expect(maxAbsDiff(dk, ref.dk), `${label} dk`).toBeLessThan(2e-5);
      expect(maxAbsDiff(dv, ref.dv), `${label} dv`).toBeLessThan(2e-5);
    }
  });

  it('SwiGLU forward and backward', () => {
    const n = 50, gate = rand(n, 40, 4), up = rand(n, 41, 2), dout = rand(n, 42);
    const out = new Float32Array(n), dg = new Float32Array(n), du = new Float32Array(n);
    core.swiglu_forward(gate, up, out, n);
    expect(maxAbsDiff(out, Float64Array.from(gate, (g, i) => silu(g) * up[i]))).toBeLessThan(1e-5);
    core.swiglu_backward(gate, up, dout, dg, du, n);
    const G = f64(gate), U = f64(up);
    expect(maxAbsDiff(dg, numericGrad((x) => x.map((g, i) => silu(g) * U[i]), G, dout))).toBeLessThan(1e-5);
    expect(maxAbsDiff(du, numericGrad((x) => x.map((u, i) => silu(G[i]) * u), U, dout))).toBeLessThan(1e-5);
    // Gates far out on both sides (the vector e^x clamps its input): σ saturates to 0 and 1 without NaN or inf.
    const wide = Float32Array.from(rand(n, 43, 120), (g, i) => (i === 0 ? -1e30 : i === 1 ? 1e30 : g));
    core.swiglu_forward(wide, up, out, n);
    core.swiglu_backward(wide, up, dout, dg, du, n);
    const rel = (a: number, b: number) => Math.abs(a - b) / (1e-30 + Math.abs(b));
    for (let i = 2; i < n; i++) {
      const g = wide[i], sg = 1 / (1 + Math.exp(-g));
      expect(rel(out[i], g * sg * up[i]), `silu(${g})`).toBeLessThan(1e-5);
      expect(rel(du[i], dout[i] * g * sg), `d/dup at ${g}`).toBeLessThan(1e-5);
    }
    expect([out[0], out[1], du[0], dg[0], dg[1]].every(Number.isFinite)).toBe(true);
    expect(out[1]).toBeCloseTo(1e30 * up[1], -25);
  });

  it('softmax cross-entropy with ignored rows, forward and backward', () => {
    const n = 6, vocab = 13, logits = rand(n * vocab, 50, 5), targets = Int32Array.from([3, -1, 12, 0, -1, 7]);
    const want = refCrossEntropy(f64(logits), targets, n, vocab);
    expect(core.cross_entropy_forward(logits, targets, n, vocab)).toBeCloseTo(want, 5);
    const grad = new Float32Array(n * vocab), scale = 0.5;
    expect(core.cross_entropy_backward(logits, targets, n, vocab, scale, grad)).toBeCloseTo(want, 5);
    const num = numericGrad((x) => Float64Array.of(refCrossEntropy(x, targets, n, vocab)), f64(logits), [scale]);
    expect(maxAbsDiff(grad, num)).toBeLessThan(1e-5);
    // In place (dlogits = logits) gives the same gradient.
    const inPlace = logits.slice();
    core.cross_entropy_backward(inPlace, targets, n, vocab, scale, inPlace);
    expect(maxAbsDiff(inPlace, grad)).toBe(0);
  });

  it('residual add and fp16/bf16 casts', () => {
    const n = 1000, y = rand(n, 60), x = rand(n, 61), want = Float64Array.from(y, (v, i) => v + x[i]);
    core.add_inplace(y, x, n);
    expect(maxAbsDiff(y, want)).toBeLessThan(1e-6);
    const vals = Float32Array.from([...rand(n, 62, 70000), 0, -0, 1e-8, 6e-8, 65504, 65520, Infinity, -Infinity, 1 / 3]);
    const h = new Uint16Array(vals.length), bf = new Uint16Array(vals.length), back = new Float32Array(vals.length);
    core.f32_to_f16(vals, h, vals.length);
    core.f32_to_bf16(vals, bf, vals.length);
    expect(Array.from(h)).toEqual(Array.from(vals, f32ToF16Bits));
    expect(Array.from(bf)).toEqual(Array.from(vals, f32ToBf16Bits));
    core.f16_to_f32(h, back, vals.length);
    expect(Array.from(back)).toEqual(Array.from(h, f16BitsToF32));
    core.bf16_to_f32(bf, back, vals.length);
    expect(Array.from(back)).toEqual(Array.from(bf, (b) => new Float32Array(new Uint32Array([b << 16]).buffer)[0]));
  });

  it('adamw_update is the host AdamW bit for bit (clipping scale, weight decay, bias correction); sum_squares its norm²', () => {
    const n = 1000;
    const p0 = rand(n, 31), g = rand(n, 32, 3);
    const [pa, pb] = [new Float32Array(p0), new Float32Array(p0)];
    const host = new AdamW([{ key: 'x', block: 0, proj: 'q', which: 'a', data: pa }], { ...ADAMW_DEFAULTS, weightDecay: 0.01 });
    const [m, v] = [new Float32Array(n), new Float32Array(n)];
    for (let t = 1; t <= 3; t++) {
      const lr = 1e-3 * t, scale = 0.37;
      host.step([g], lr, scale);
      core.adamw_update(pb, g, m, v, n, lr, 0.9, 0.999, 1e-8, 1 - lr * 0.01, scale, 1 - 0.9 ** t, 1 - 0.999 ** t);
    }
    expect(Array.from(pb)).toEqual(Array.from(pa));
    expect(Array.from(m)).toEqual(Array.from(host.m[0]));
    expect(Array.from(v)).toEqual(Array.from(host.v[0]));
    expect(Math.sqrt(core.sum_squares(g, n))).toBe(globalNorm([g]));
  });

  it('rejects arrays of the wrong size, naming the argument', () => {
    expect(() => core.gemm(new Float32Array(3), new Float32Array(4), new Float32Array(2), 1, 2, 4, false, true, false)).toThrow(/argument 'a'.*length 4/);
  });
});
