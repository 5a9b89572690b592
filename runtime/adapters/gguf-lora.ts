// llama.cpp's LoRA adapter GGUF (what convert_lora_to_gguf.py writes and llama_adapter_lora_init reads):
// general.type "adapter", general.architecture of the base, adapter.type "lora", adapter.lora.alpha (F32; 0 means
// "scale 1"), and per target tensor T of the base the pair T.lora_a (ggml dims [in, r], i.e. PEFT's [r, in]) and
// T.lora_b (dims [r, out]). llama.cpp applies y += scale·alpha/r·B·(A·x) with r = lora_b's dims[0] per tensor and
// scale the user's (llama-server --lora-scaled, node-llama-cpp's lora.adapters[].scale). q/k rows are in the Meta
// layout, like the base GGUF.
import { PROJECTIONS } from '../../dsl/resolved.ts';
import { QaloraError } from '../errors.ts';
import { GgmlType, GgufValueType as T, ggufTensorF32, readGguf, writeGguf, type GgufFile, type GgufWriteKV, type GgufWriteTensor } from '../formats/gguf.ts';
import { GGUF_PROJECTION } from '../formats/gguf-llama.ts';
import type { AdapterSet, LlamaConfig, ProjectionName } from '../model/types.ts';
import { f32ToBf16Bits, f32ToF16Bits } from '../safetensors.ts';
import { inFeatures, outFeatures } from './peft.ts';

export type LoraDType = 'f32' | 'f16' | 'bf16';

const PROJ_OF_GGUF = Object.fromEntries(Object.entries(GGUF_PROJECTION).map(([p, g]) => [g, p])) as Record<string, ProjectionName>;
const TENSOR = /^blk\.(\d+)\.(\w+)\.weight\.lora_([ab])$/;

export function ggufLoraName(block: number, p: ProjectionName, which: 'a' | 'b'): string {
  return `blk.${block}.${GGUF_PROJECTION[p]}.weight.lora_${which}`;
}

/** Values as stored in a file of this dtype (F32 kept; F16/BF16 rounded to nearest even). */
export function encodeFloats(a: Float32Array, dtype: LoraDType): Uint8Array {
  if (dtype === 'f32') return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  const conv = dtype === 'f16' ? f32ToF16Bits : f32ToBf16Bits;
  const h = Uint16Array.from(a, (v) => conv(v));
  return new Uint8Array(h.buffer);
}

export interface GgufLoraOptions {
  dtype?: LoraDType;
  name?: string;
  extra?: GgufWriteKV[];
}

/**
 * Writes plain LoRA adapters (A [r, in], rows of B in the Meta layout) as a llama.cpp LoRA GGUF. One alpha serves
 * every tensor in llama.cpp, so layers whose alpha differs from the most common one get the ratio folded into A
 * (listed by projection in `rescaled`). Returns the alpha written and the file's size.
 */
export function writeGgufLora(path: string, set: AdapterSet, opts: GgufLoraOptions = {}): { alpha: number; rescaled: string[]; bytes: number } {
  const dtype = opts.dtype ?? 'f32';
  const counts = new Map<number, number>();
  for (const block of set) for (const ad of Object.values(block)) if (ad && ad.rank > 0) counts.set(ad.alpha, (counts.get(ad.alpha) ?? 0) + 1);
  if (counts.size === 0) throw new QaloraError('no adapters to write (every layer has rank 0)');
  const alpha = [...counts.entries()].sort((a, b) => b[1] - a[1])[0][0];
  const type = { f32: GgmlType.F32, f16: GgmlType.F16, bf16: GgmlType.BF16 }[dtype];
  const tensors: GgufWriteTensor[] = [];
  const rescaled: string[] = [];
  set.forEach((block, l) => {
    for (const p of PROJECTIONS) {
      const ad = block?.[p];
      if (!ad || ad.rank === 0) continue;
      const inF = ad.a.length / ad.rank, out = ad.b.length / ad.rank;
      let a = ad.a;
      if (ad.alpha !== alpha) {
        a = a.map((v) => (v * ad.alpha) / alpha);
        const what = `${p}_proj (alpha ${ad.alpha})`;
        if (!rescaled.includes(what)) rescaled.push(what);
      }
      tensors.push({ name: ggufLoraName(l, p, 'a'), dims: [inF, ad.rank], type, data: encodeFloats(a, dtype) });
      tensors.push({ name: ggufLoraName(l, p, 'b'), dims: [ad.rank, out], type, data: encodeFloats(ad.b, dtype) });
    }
  });
  const kvs: GgufWriteKV[] = [
    ['general.architecture', T.STRING, 'llama'],
    ['general.type', T.STRING, 'adapter'],
    ['general.name', T.STRING, opts.name ?? 'qalora-lora'],
    ['general.alignment', T.U32, 32],
    ['general.file_type', T.U32, { f32: 0, f16: 1, bf16: 32 }[dtype]],
    ['adapter.type', T.STRING, 'lora'],
    // llama.cpp reads this key with gguf_get_val_f32, which aborts on any other type.
    ['adapter.lora.alpha', T.F32, alpha],
    ...(opts.extra ?? []),
  ];
  return { alpha, rescaled, bytes: writeGguf(path, kvs, tensors, 3, 32) };
}

function metaString(f: GgufFile, key: string): string | undefined {
  const v = f.metadata.get(key)?.value;
  return typeof v === 'string' ? v : undefined;
}

/**
 * Reads a llama.cpp LoRA adapter GGUF as plain LoRA adapters (A [r, in], B rows in the Meta layout), checking
 * it is one (a model GGUF passed by mistake is named by its first non-LoRA tensor) and, given the base's config,
 * that every tensor fits the base.
 */
export function readGgufLora(path: string, model?: LlamaConfig): AdapterSet {
  const f = readGguf(path);
  try {
    return adaptersOf(f, path, model);
  } finally {
    f.close();
  }
}

function adaptersOf(f: GgufFile, path: string, model?: LlamaConfig): AdapterSet {
  const type = metaString(f, 'general.type');
  for (const [name] of f.tensors) {
    // llama.cpp skips *_norm.weight tensors in adapters (mergekit extracts them); so do we.
    if (TENSOR.test(name) || name.endsWith('_norm.weight')) continue;
    throw new QaloraError(
      `${path}: tensor '${name}' is not a LoRA tensor (expected blk.N.<proj>.weight.lora_a / .lora_b)` +
      (type === 'adapter' ? '' : `; general.type is ${type ? `'${type}'` : 'missing'}: this looks like a model GGUF, not a LoRA adapter (pass it as --model)`),
    );
  }
  if (type !== 'adapter') throw new QaloraError(`${path}: general.type is ${type ? `'${type}'` : 'missing'}, a llama.cpp LoRA adapter has 'adapter'`);
  const adType = metaString(f, 'adapter.type');
  if (adType !== 'lora') throw new QaloraError(`${path}: adapter.type is ${adType ? `'${adType}'` : 'missing'}, only 'lora' adapters are supported`);
  const arch = metaString(f, 'general.architecture');
  if (arch !== 'llama') throw new QaloraError(`${path}: general.architecture is '${arch}', only 'llama' is supported`);
  const alphaKv = f.metadata.get('adapter.lora.alpha');
  const alpha = alphaKv === undefined ? 0 : Number(alphaKv.value);

  const set: AdapterSet = [];
  for (const [name] of f.tensors) {
    const m = TENSOR.exec(name);
    if (!m || m[3] !== 'a') continue;
    const block = Number(m[1]), proj = PROJ_OF_GGUF[m[2]];
    if (!proj) throw new QaloraError(`${path}: tensor '${name}' targets '${m[2]}', which is not a LLaMA projection (${Object.values(GGUF_PROJECTION).join(', ')})`);
    const bName = ggufLoraName(block, proj, 'b');
    const ta = f.tensors.get(name)!, tb = f.tensors.get(bName);
    if (!tb) throw new QaloraError(`${path}: '${name}' has no matching '${bName}'`);
    if (ta.dims.length !== 2 || tb.dims.length !== 2) throw new QaloraError(`${path}: '${name}' / '${bName}' must be 2-D, have dims [${ta.dims}] / [${tb.dims}]`);
    const [inF, rank] = ta.dims, [rankB, out] = tb.dims;
    if (rank !== rankB) throw new QaloraError(`${path}: '${name}' has rank ${rank} (dims [${ta.dims}]) but '${bName}' has ${rankB} (dims [${tb.dims}])`);
    if (model) {
      if (block >= model.layers) throw new QaloraError(`${path}: tensor '${name}' is for block ${block}, the base has ${model.layers} blocks`);
      const wantIn = inFeatures(model, proj), wantOut = outFeatures(model, proj);
      if (inF !== wantIn) throw new QaloraError(`${path}: tensor '${name}' has ${inF} inputs (dims [${ta.dims}]), the base's ${GGUF_PROJECTION[proj]} has ${wantIn}`);
      if (out !== wantOut) throw new QaloraError(`${path}: tensor '${bName}' has ${out} outputs (dims [${tb.dims}]), the base's ${GGUF_PROJECTION[proj]} has ${wantOut}`);
    }
    while (set.length <= block) set.push({});
    // alpha 0: llama.cpp applies the user's scale alone, i.e. s = 1 = alpha/rank with alpha = rank.
    set[block][proj] = { rank, alpha: alpha || rank, a: ggufTensorF32(f, name).slice(), b: ggufTensorF32(f, bName).slice() };
  }
  for (const [name] of f.tensors) {
    const m = TENSOR.exec(name);
    if (m && m[3] === 'b' && !f.tensors.has(name.replace(/lora_b$/, 'lora_a'))) throw new QaloraError(`${path}: '${name}' has no matching lora_a tensor`);
  }
  if (set.length === 0) throw new QaloraError(`${path}: the adapter has no lora_a/lora_b tensors`);
  if (model) while (set.length < model.layers) set.push({});
  return set;
}
