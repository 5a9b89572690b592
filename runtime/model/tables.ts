// Token tables in the type a spec names (`tables …`, dsl/defaults.ts TABLE_TYPES): the embedding and classifier
// converted once, on load, before anything runs on them. `file` keeps the checkpoint's own type (F16/BF16 bits,
// GGUF blocks, fp32). The block types are quantized as llama.cpp's quantize does (formats/ggml-quantize.ts) and
// then held exactly like a GGUF file's blocks, so a GGUF export writes those blocks back.
import type { TableType, TableTypes } from '../../dsl/resolved.ts';
import { QaloraError } from '../errors.ts';
import { EXACT_BLOCK_TYPES, blocksToQuantLinear, symmetricBlocks } from '../formats/ggml-blocks.ts';
import { quantizeGgml } from '../formats/ggml-quantize.ts';
import { GgmlType } from '../formats/ggml-types.ts';
import { f32ToBf16Bits, f32ToF16Bits } from '../safetensors.ts';
import { denseTable } from './dense.ts';
import type { LlamaWeights, LoadedLinear, TokenTable } from './types.ts';

const BLOCK_TYPE = { q8_0: GgmlType.Q8_0, q4_1: GgmlType.Q4_1, q4_0: GgmlType.Q4_0 } as const;

/** What a table is stored as now, in the spec's words; undefined for a quantized table of no ggml block type. */
export function tableTypeOf(t: TokenTable): TableType | undefined {
  if (t instanceof Float32Array) return 'fp32';
  if (t.kind === 'half') return t.dtype;
  const { bits, group, scales } = t.settings;
  if (group !== 32 || scales !== 'fp16') return undefined;
  if (bits === 8) return symmetricBlocks(t, -128) ? 'q8_0' : undefined;
  return bits === 4 ? (symmetricBlocks(t, -8) ? 'q4_0' : 'q4_1') : undefined;
}

/**
 * The table `t` [vocab, dim] held as `type`; the same object when it already is (or `type` is `file`). A few
 * thousand rows are widened at a time, so the peak is the two tables plus one slice in fp32, never the whole
 * table in fp32 (262 MB at 32000 × 2048).
 */
export function tableAs(t: TokenTable, type: TableType, vocab: number, dim: number): TokenTable {
  if (type === 'file' || tableTypeOf(t) === type) return t;
  if (type === 'fp32') return denseTable(t);
  if (type === 'fp16' || type === 'bf16') {
    const to = type === 'fp16' ? f32ToF16Bits : f32ToBf16Bits;
    const data = new Uint16Array(vocab * dim);
    for (let r0 = 0; r0 < vocab; r0 += SLICE_ROWS) {
      const w = tableRows(t, r0, Math.min(vocab, r0 + SLICE_ROWS), dim);
      for (let i = 0, o = r0 * dim; i < w.length; i++, o++) data[o] = to(w[i]);
    }
    return { kind: 'half', dtype: type, out: vocab, in: dim, data };
  }
  if (dim % 32 !== 0) throw new QaloraError(`tables ${type}: rows of dim = ${dim} are not whole blocks of 32`);
  // The conversion pulls its blocks a slice at a time; each slice is quantized from the rows it covers.
  const ggml = BLOCK_TYPE[type], bb = EXACT_BLOCK_TYPES.get(ggml)!.blockBytes, perRow = dim / 32;
  return blocksToQuantLinear(ggml, (target, at) => {
    const b0 = at / bb, blocks = target.length / bb;
    const r0 = Math.floor(b0 / perRow), r1 = Math.ceil((b0 + blocks) / perRow);
    const w = tableRows(t, r0, r1, dim).subarray((b0 - r0 * perRow) * 32, (b0 - r0 * perRow + blocks) * 32);
    target.set(quantizeGgml(ggml, w, 1, w.length));
  }, vocab, dim, { scales: 'fp16' })!;
}

const SLICE_ROWS = 4096;

/** Rows [r0, r1) of a table in fp32 (a view of an fp32 table; widened or dequantized otherwise). */
function tableRows(t: TokenTable, r0: number, r1: number, dim: number): Float32Array {
  if (t instanceof Float32Array) return t.subarray(r0 * dim, r1 * dim);
  const rows = r1 - r0;
  if (t.kind === 'half') return denseTable({ ...t, out: rows, data: t.data.subarray(r0 * dim, r1 * dim) });
  const words = t.qweight.length / t.out, groups = t.alpha.length / t.out;
  return denseTable({
    ...t, out: rows, qweight: t.qweight.subarray(r0 * words, r1 * words),
    alpha: t.alpha.subarray(r0 * groups, r1 * groups), beta: t.beta.subarray(r0 * groups, r1 * groups),
  });
}

/**
 * The weights with their token tables in the spec's types. A tied classifier is the embedding itself, so the two
 * must name one type; the conversion is done once and shared.
 */
export function withTableTypes<L extends LoadedLinear>(w: LlamaWeights<L>, tables: TableTypes | undefined): LlamaWeights<L> {
  if (!tables || (tables.embedding === 'file' && tables.classifier === 'file')) return w;
  const { vocab, dim } = w.config;
  if (w.classifier === w.tokEmbedding) {
    if (tables.embedding !== tables.classifier) {
      throw new QaloraError(`the model ties its classifier to the token embedding, so both are one table; the spec names embedding ${tables.embedding} and classifier ${tables.classifier}: write \`tables ${tables.embedding === 'file' ? tables.classifier : tables.embedding}\``);
    }
    const t = tableAs(w.tokEmbedding, tables.embedding, vocab, dim);
    return { ...w, tokEmbedding: t, classifier: t };
  }
  return { ...w, tokEmbedding: tableAs(w.tokEmbedding, tables.embedding, vocab, dim), classifier: tableAs(w.classifier, tables.classifier, vocab, dim) };
}
