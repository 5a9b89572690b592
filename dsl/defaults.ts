// What a spec gets when it does not say. QA-LoRA settings follow the paper's reference code (4-bit, group 32,
// rank 64, alpha 16, dropout 0.05, mean pooling), except the activation dtype: fp32, the one every backend
// runs and the one the reference checks bit-for-bit; ask for fp16/bf16 explicitly. Scales (α, β) default to fp32 for
// the same reason; `scales fp16` is opt-in (it rounds what min-max quantization computes). specs/README.md lists these.
import type { Projection, QaloraSettings, TableType } from './resolved.ts';

export const DEFAULT_SETTINGS: Readonly<QaloraSettings> = {
  bits: 4,
  group: 32,
  rank: 64,
  alpha: 16,
  dropout: 0.05,
  pool: 'mean',
  dtype: 'fp32',
  scales: 'fp32',
};

export const DEFAULT_ROPE_THETA = 10000;
export const DEFAULT_NORM_EPS = 1e-5;
export const DEFAULT_CUDA_ARCHS: readonly string[] = ['sm_80', 'sm_90'];

export const BITS = [2, 3, 4, 8] as const;
export const POOLS = ['mean', 'sum', 'peft'] as const;
export const DTYPES = ['fp32', 'fp16', 'bf16'] as const;
export const SCALE_DTYPES = ['fp32', 'fp16'] as const;
/**
 * How a model holds its token embedding and classifier: `file` keeps the checkpoint's own type; the others convert
 * on load — fp32, the half types, or ggml's group-32 blocks (quantized as llama.cpp's quantize does, so a GGUF
 * export writes them back as those blocks).
 */
export const TABLE_TYPES: readonly TableType[] = ['file', 'fp32', 'fp16', 'bf16', 'q8_0', 'q4_1', 'q4_0'];

/** CUDA archs qalora builds for (Ampere and newer). `a` variants enable arch-specific features (wgmma on sm_90a). */
export const KNOWN_ARCHS: readonly string[] = [
  'sm_80', 'sm_86', 'sm_87', 'sm_88', 'sm_89', 'sm_90', 'sm_90a',
  'sm_100', 'sm_100a', 'sm_103', 'sm_103a', 'sm_110', 'sm_110a', 'sm_120', 'sm_120a', 'sm_121', 'sm_121a',
];
/**
 * The oldest arch the emitted CUDA builds for: every specialization's GEMM stages tiles with cp.async, and the
 * fp16/bf16 ones multiply with mma.sync m16n8k16; ptxas rejects both below sm_80 ("Feature 'cp.async' requires
 * .target sm_80 or higher"; sm_75 was checked with nvcc 13.0, which no longer knows sm_70/sm_72 at all).
 */
export const MIN_CUDA_ARCH = 80;

/** One line per key, for "missing key" hints and the table in specs/README.md. */
export const LLAMA_KEYS: Readonly<Record<string, string>> = {
  dim: 'model width (HF hidden_size)',
  hidden: 'feed-forward width (HF intermediate_size)',
  layers: 'transformer blocks',
  heads: 'attention heads',
  kv_heads: 'key/value heads (grouped-query attention); default: heads',
  vocab: 'vocabulary size',
  context: 'maximum sequence length',
  rope_theta: `RoPE base frequency; default ${DEFAULT_ROPE_THETA}`,
  norm_eps: `RMSNorm epsilon; default ${DEFAULT_NORM_EPS}`,
};
export const REQUIRED_LLAMA_KEYS = ['dim', 'hidden', 'layers', 'heads', 'vocab', 'context'] as const;

/** in → out features of each projection, from the model shape. */
export function projectionShape(p: Projection, m: { dim: number; hidden: number; heads: number; kvHeads: number }): { in: number; out: number; inKey: string } {
  const kvDim = (m.dim / m.heads) * m.kvHeads;
  switch (p) {
    case 'q': case 'o': return { in: m.dim, out: m.dim, inKey: 'dim' };
    case 'k': case 'v': return { in: m.dim, out: kvDim, inKey: 'dim' };
    case 'gate': case 'up': return { in: m.dim, out: m.hidden, inKey: 'dim' };
    case 'down': return { in: m.hidden, out: m.dim, inKey: 'hidden' };
  }
}

export function divisors(n: number): number[] {
  const small: number[] = [];
  const large: number[] = [];
  for (let d = 1; d * d <= n; d++) {
    if (n % d !== 0) continue;
    small.push(d);
    if (d * d !== n) large.unshift(n / d);
  }
  return [...small, ...large];
}

/** The divisor of n nearest to g (ties: the larger), for "use group N instead" hints. */
export function nearestDivisor(n: number, g: number): number {
  return divisors(n).reduce((best, d) => (Math.abs(d - g) < Math.abs(best - g) || (Math.abs(d - g) === Math.abs(best - g) && d > best) ? d : best), 1);
}
