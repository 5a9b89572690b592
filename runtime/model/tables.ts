// Token tables in the type a spec names (`tables …`, dsl/defaults.ts TABLE_TYPES): the embedding and classifier
// converted once, on load, before anything runs on them. `file` keeps the checkpoint's own type (F16/BF16 bits,
// GGUF blocks, fp32). The block types are quantized as llama.cpp's quantize does (formats/ggml-quantize.ts) and
// then held exactly like a GGUF file's blocks, so a GGUF export writes those blocks back.
import type { TableType, TableTypes } from '../../dsl/resolved.ts';
import { QaloraError } from '../errors.ts';
import { blocksToQuantLinear, symmetricBlocks } from '../formats/ggml-blocks.ts';
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

/** The table `t` [vocab, dim] held as `type`; the same object when it already is (or `type` is `file`). */
export function tableAs(t: TokenTable, type: TableType, vocab: number, dim: number): TokenTable {
  if (type === 'file' || tableTypeOf(t) === type) return t;
  const w = denseTable(t);
  switch (type) {
    case 'fp32':
      return w;
    case 'fp16':
    case 'bf16': {
      const to = type === 'fp16' ? f32ToF16Bits : f32ToBf16Bits;
      const data = new Uint16Array(w.length);
      for (let i = 0; i < w.length; i++) data[i] = to(w[i]);
      return { kind: 'half', dtype: type, out: vocab, in: dim, data };
    }
    default: {
      if (dim % 32 !== 0) throw new QaloraError(`tables ${type}: rows of dim = ${dim} are not whole blocks of 32`);
      return blocksToQuantLinear(BLOCK_TYPE[type], quantizeGgml(BLOCK_TYPE[type], w, vocab, dim), vocab, dim, { scales: 'fp16' })!;
    }
  }
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
