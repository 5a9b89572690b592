// Weights as plain fp32 matrices, for writers of float formats and for tests: a quantized layer or token table
// dequantized exactly as the kernels do (fround(α·q) + β).
import { unpackQ, wordsPerRow } from '../reference/numeric.ts';
import { bf16ToF32Array, f16ToF32Array, tensorOf, type SafeTensor } from '../safetensors.ts';
import type { Linear, LlamaWeights, LoadedLinear, ProjectionName, TokenTable } from './types.ts';
import { scaleValues } from './scales.ts';

/** W [out, in] of any linear layer in F32 (quantized layers dequantized exactly as the kernels do: α·q + β). */
export function denseWeight(lin: Linear): Float32Array {
  if (lin.kind === 'float') return lin.w;
  const { out, in: inF } = lin;
  const { bits, group } = lin.settings;
  const L = inF / group, wpr = wordsPerRow(inF, bits);
  const alpha = scaleValues(lin.alpha), beta = scaleValues(lin.beta);
  const w = new Float32Array(out * inF);
  for (let o = 0; o < out; o++) {
    for (let i = 0; i < inF; i++) {
      const k = Math.floor(i / group);
      w[o * inF + i] = Math.fround(alpha[o * L + k] * unpackQ(lin.qweight, o * wpr, i, bits)) + beta[o * L + k];
    }
  }
  return w;
}

/** A token table [vocab, dim] in fp32 (the array itself when it is one; half bits widened, which is exact). */
export function denseTable(t: TokenTable): Float32Array {
  if (t instanceof Float32Array) return t;
  if (t.kind === 'half') return t.dtype === 'bf16' ? bf16ToF32Array(t.data) : f16ToF32Array(t.data);
  return denseWeight(t);
}

/** A token table as a safetensors tensor [vocab, dim]: a half table in its own type (the same bits), else fp32. */
export function tableTensor(t: TokenTable, vocab: number, dim: number): SafeTensor {
  if (!(t instanceof Float32Array) && t.kind === 'half') return tensorOf(t.dtype === 'bf16' ? 'BF16' : 'F16', [vocab, dim], t.data);
  return tensorOf('F32', [vocab, dim], denseTable(t));
}

/** Every projection still in its file read as fp32 (tests, float writers); quant layers and tables as they are. */
export function readAllFloat(w: LlamaWeights<LoadedLinear>): LlamaWeights {
  const blocks = w.blocks.map((b) => {
    const proj = {} as Record<ProjectionName, Linear>;
    for (const [p, lin] of Object.entries(b.proj) as Array<[ProjectionName, LoadedLinear]>) {
      proj[p] = lin.kind === 'file' ? { kind: 'float', out: lin.out, in: lin.in, w: lin.readFloat() } : lin;
    }
    return { ...b, proj };
  });
  return { ...w, blocks };
}
