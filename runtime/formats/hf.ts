// Hugging Face LLaMA directories: config.json + model.safetensors (or a sharded index). HF stores q/k rows in
// the rotate-half order (RoPE pairs i and i + head_dim/2); we keep the Meta order (pairs 2i, 2i+1), so rows are
// permuted on the way in and out, per head, with n_kv_heads for k (GQA). Tensors are read one at a time from the
// (possibly sharded) files: norms and the embedding now, projections when the model is prepared (FileLinear).
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { QaloraError } from '../errors.ts';
import type { BlockWeights, FileLinear, LlamaConfig, LlamaWeights, LoadedLinear, ProjectionName, TokenTable } from '../model/types.ts';
import {
  asF32, DTYPE_BYTES, type LazyTensor, numel, openSafetensors, readTensor, type SafeTensor, type StoredTensor, tensorOf, writeSafetensors, writeFileAtomic,
} from '../safetensors.ts';
import { tableTensor } from '../model/dense.ts';

export const HF_PROJECTION: Record<ProjectionName, string> = {
  q: 'self_attn.q_proj', k: 'self_attn.k_proj', v: 'self_attn.v_proj', o: 'self_attn.o_proj',
  gate: 'mlp.gate_proj', up: 'mlp.up_proj', down: 'mlp.down_proj',
};

export interface HfConfigJson {
  hidden_size: number;
  intermediate_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  num_key_value_heads?: number;
  vocab_size: number;
  rms_norm_eps?: number;
  rope_theta?: number;
  rope_scaling?: { type?: string; rope_type?: string } | null;
  max_position_embeddings?: number;
  tie_word_embeddings?: boolean;
  model_type?: string;
  head_dim?: number;
  [k: string]: unknown;
}

export function readHfConfig(dir: string): { config: LlamaConfig; json: HfConfigJson } {
  const path = join(dir, 'config.json');
  let json: HfConfigJson;
  try {
    json = JSON.parse(readFileSync(path, 'utf8'));
  } catch (e) {
    throw new QaloraError(`${path}: cannot read config.json (${(e as Error).message})`);
  }
  if (json.model_type !== undefined && json.model_type !== 'llama' && json.model_type !== 'mistral') {
    throw new QaloraError(`${path}: model_type '${json.model_type}' is not a LLaMA`);
  }
  for (const k of ['hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'vocab_size'] as const) {
    if (!Number.isInteger(json[k]) || json[k] <= 0) throw new QaloraError(`${path}: '${k}' must be a positive integer, got ${JSON.stringify(json[k])}`);
  }
  const scaling = json.rope_scaling;
  const kind = scaling?.rope_type ?? scaling?.type;
  if (scaling && kind !== 'default') {
    throw new QaloraError(`${path}: rope_scaling ${JSON.stringify(scaling)} is not supported (plain RoPE with rope_theta only)`);
  }
  const heads = json.num_attention_heads;
  const kvHeads = json.num_key_value_heads ?? heads;
  if (json.hidden_size % heads !== 0 || heads % kvHeads !== 0) {
    throw new QaloraError(`${path}: hidden_size ${json.hidden_size}, num_attention_heads ${heads}, num_key_value_heads ${kvHeads} are inconsistent`);
  }
  if (json.head_dim !== undefined && json.head_dim !== json.hidden_size / heads) {
    throw new QaloraError(`${path}: head_dim ${json.head_dim} ≠ hidden_size / num_attention_heads is not supported`);
  }
  const config: LlamaConfig = {
    dim: json.hidden_size,
    hidden: json.intermediate_size,
    layers: json.num_hidden_layers,
    heads,
    kvHeads,
    vocab: json.vocab_size,
    context: json.max_position_embeddings ?? 2048,
    ropeTheta: json.rope_theta ?? 10000,
    normEps: json.rms_norm_eps ?? 1e-6,
    tiedClassifier: json.tie_word_embeddings ?? false,
  };
  return { config, json };
}

/**
 * Every tensor of the checkpoint by name, not yet read (StoredTensor.read): model.safetensors, or the shards a
 * model.safetensors.index.json lists. Only the headers are read here.
 */
export function readHfTensors(dir: string): Map<string, StoredTensor> {
  const single = join(dir, 'model.safetensors');
  const index = join(dir, 'model.safetensors.index.json');
  const out = new Map<string, StoredTensor>();
  const add = (file: string) => {
    for (const [name, t] of openSafetensors(file).tensors) out.set(name, t);
  };
  if (existsSync(index)) {
    let map: Record<string, string>;
    try {
      map = JSON.parse(readFileSync(index, 'utf8')).weight_map;
    } catch (e) {
      throw new QaloraError(`${index}: cannot read the shard index (${(e as Error).message})`);
    }
    if (!map || typeof map !== 'object') throw new QaloraError(`${index}: no weight_map`);
    for (const shard of new Set(Object.values(map))) add(join(dir, shard));
    for (const [name, shard] of Object.entries(map)) {
      if (!out.has(name)) throw new QaloraError(`${join(dir, shard)}: tensor '${name}' listed in ${index} is not in the shard`);
    }
  } else if (existsSync(single)) {
    add(single);
  } else {
    const bin = existsSync(join(dir, 'pytorch_model.bin')) ? ' (pytorch_model.bin is a pickle: convert it to safetensors)' : '';
    throw new QaloraError(`${dir}: no model.safetensors or model.safetensors.index.json${bin}`);
  }
  return out;
}

/** HF rotate-half rows → Meta interleaved rows, per head: Meta[h·d + 2i + t] = HF[h·d + t·d/2 + i]. */
export function hfToMetaRows(w: Float32Array, heads: number, cols: number): Float32Array {
  return permuteRows(w, heads, cols, true);
}

/** Meta interleaved rows → HF rotate-half rows (the inverse of hfToMetaRows). */
export function metaToHfRows(w: Float32Array, heads: number, cols: number): Float32Array {
  return permuteRows(w, heads, cols, false);
}

function permuteRows(w: Float32Array, heads: number, cols: number, toMeta: boolean): Float32Array {
  const rows = w.length / cols;
  const d = rows / heads;
  const out = new Float32Array(w.length);
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < d / 2; i++) {
      for (let t = 0; t < 2; t++) {
        const meta = h * d + 2 * i + t;
        const hf = h * d + t * (d / 2) + i;
        const [dst, src] = toMeta ? [meta, hf] : [hf, meta];
        out.set(w.subarray(src * cols, (src + 1) * cols), dst * cols);
      }
    }
  }
  return out;
}

/** A float tensor of the checkpoint, its shape and dtype checked now, before anything is read. */
function floatTensor(dir: string, tensors: Map<string, StoredTensor>, name: string, shape: number[]): StoredTensor {
  const t = tensors.get(name);
  if (!t) throw new QaloraError(`${dir}: missing tensor '${name}' (expected shape [${shape}])`);
  if (t.shape.length !== shape.length || t.shape.some((s, i) => s !== shape[i])) {
    throw new QaloraError(`${t.file}: tensor '${name}' has shape [${t.shape}], expected [${shape}]`);
  }
  if (!['F32', 'F16', 'BF16'].includes(t.dtype)) throw new QaloraError(`${t.file}: tensor '${name}' has dtype ${t.dtype}, expected F32, F16 or BF16`);
  return t;
}

/**
 * A checkpoint's token table [vocab, dim]: F16/BF16 kept as their bits (HalfTable: the classifier reads them
 * directly), F32 as is.
 */
export function readTable(t: StoredTensor, vocab: number, dim: number): TokenTable {
  if (t.dtype !== 'F16' && t.dtype !== 'BF16') return readF32(t);
  const bytes = t.read();
  const data = bytes.byteOffset % 2 === 0 ? new Uint16Array(bytes.buffer, bytes.byteOffset, vocab * dim) : new Uint16Array(bytes.slice().buffer);
  return { kind: 'half', dtype: t.dtype === 'BF16' ? 'bf16' : 'fp16', out: vocab, in: dim, data };
}

/** The checkpoint's tensor as fp32: F32 read straight into its array, F16/BF16 widened. */
export function readF32(t: StoredTensor): Float32Array {
  return asF32(readTensor(t));
}

/** The model in an HF directory; projections stay in the files until the model is prepared. */
export function readHfModel(dir: string): LlamaWeights<LoadedLinear> {
  const { config } = readHfConfig(dir);
  const tensors = readHfTensors(dir);
  const { dim, hidden, layers, heads, kvHeads, vocab } = config;
  const kvDim = (dim / heads) * kvHeads;
  const get = (name: string, shape: number[]): Float32Array => readF32(floatTensor(dir, tensors, name, shape));
  const table = (name: string) => readTable(floatTensor(dir, tensors, name, [vocab, dim]), vocab, dim);
  const tokEmbedding = table('model.embed_tokens.weight');
  const shapes: Record<ProjectionName, [number, number]> = {
    q: [dim, dim], k: [kvDim, dim], v: [kvDim, dim], o: [dim, dim], gate: [hidden, dim], up: [hidden, dim], down: [dim, hidden],
  };
  const blocks: BlockWeights<LoadedLinear>[] = [];
  for (let l = 0; l < layers; l++) {
    const pre = `model.layers.${l}`;
    const proj = {} as Record<ProjectionName, FileLinear>;
    for (const p of Object.keys(shapes) as ProjectionName[]) {
      const [out, inp] = shapes[p];
      const name = `${pre}.${HF_PROJECTION[p]}.weight`;
      const t = floatTensor(dir, tensors, name, [out, inp]);
      const ropeHeads = p === 'q' ? heads : p === 'k' ? kvHeads : 0;
      proj[p] = {
        kind: 'file', out, in: inp, fileType: t.dtype, source: `${t.file}: tensor '${name}'`,
        readFloat: () => (ropeHeads ? hfToMetaRows(readF32(t), ropeHeads, inp) : readF32(t)),
      };
    }
    blocks.push({
      attnNorm: get(`${pre}.input_layernorm.weight`, [dim]),
      ffnNorm: get(`${pre}.post_attention_layernorm.weight`, [dim]),
      proj,
    });
  }
  const finalNorm = get('model.norm.weight', [dim]);
  const tied = config.tiedClassifier || !tensors.has('lm_head.weight');
  const classifier = tied ? tokEmbedding : table('lm_head.weight');
  return { config: { ...config, tiedClassifier: tied }, tokEmbedding, blocks, finalNorm, classifier };
}

export function hfConfigJson(c: LlamaConfig, dtype: 'float32' | 'float16' | 'bfloat16' = 'float32'): HfConfigJson {
  return {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    hidden_size: c.dim,
    intermediate_size: c.hidden,
    num_hidden_layers: c.layers,
    num_attention_heads: c.heads,
    num_key_value_heads: c.kvHeads,
    vocab_size: c.vocab,
    max_position_embeddings: c.context,
    rms_norm_eps: c.normEps,
    rope_theta: c.ropeTheta,
    rope_scaling: null,
    tie_word_embeddings: c.tiedClassifier,
    hidden_act: 'silu',
    bos_token_id: 1,
    eos_token_id: 2,
    torch_dtype: dtype,
  };
}

/**
 * Writes a float LLaMA as an HF directory (config.json + model.safetensors, or `shards` files with an index).
 * Quantized projections are refused: HF holds float weights (GPTQ has its own writer).
 */
export function writeHfModel(dir: string, w: LlamaWeights<LoadedLinear>, opts: { shards?: number } = {}): void {
  const { heads, kvHeads, dim } = w.config;
  mkdirSync(dir, { recursive: true });
  const tensors: [string, SafeTensor | LazyTensor][] = [['model.embed_tokens.weight', tableTensor(w.tokEmbedding, w.config.vocab, dim)]];
  w.blocks.forEach((b, l) => {
    const pre = `model.layers.${l}`;
    tensors.push([`${pre}.input_layernorm.weight`, tensorOf('F32', [dim], b.attnNorm)]);
    tensors.push([`${pre}.post_attention_layernorm.weight`, tensorOf('F32', [dim], b.ffnNorm)]);
    for (const p of Object.keys(HF_PROJECTION) as ProjectionName[]) {
      const lin = b.proj[p];
      if (lin.kind === 'quant') throw new QaloraError(`HF export: block ${l} projection ${p} is quantized; write float weights or GPTQ`);
      // Read (a FileLinear) and permuted when the writer reaches it: one projection in memory at a time.
      const ropeHeads = p === 'q' ? heads : p === 'k' ? kvHeads : 0;
      const read = () => {
        const data = lin.kind === 'file' ? lin.readFloat() : lin.w;
        const out = ropeHeads ? metaToHfRows(data, ropeHeads, lin.in) : data;
        return new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
      };
      tensors.push([`${pre}.${HF_PROJECTION[p]}.weight`, { dtype: 'F32', shape: [lin.out, lin.in], read }]);
    }
  });
  tensors.push(['model.norm.weight', tensorOf('F32', [dim], w.finalNorm)]);
  if (!w.config.tiedClassifier) tensors.push(['lm_head.weight', tableTensor(w.classifier, w.config.vocab, dim)]);
  const enc = new TextEncoder();
  writeFileAtomic(join(dir, 'config.json'), [enc.encode(JSON.stringify(hfConfigJson(w.config), null, 2) + '\n')]);
  const shards = Math.max(1, opts.shards ?? 1);
  if (shards === 1) {
    writeSafetensors(join(dir, 'model.safetensors'), new Map(tensors), { format: 'pt' });
    return;
  }
  const per = Math.ceil(tensors.length / shards);
  const weightMap: Record<string, string> = {};
  for (let s = 0; s < shards; s++) {
    const file = `model-${String(s + 1).padStart(5, '0')}-of-${String(shards).padStart(5, '0')}.safetensors`;
    const part = tensors.slice(s * per, (s + 1) * per);
    for (const [name] of part) weightMap[name] = file;
    writeSafetensors(join(dir, file), new Map(part), { format: 'pt' });
  }
  const total = tensors.reduce((a, [, t]) => a + numel(t.shape) * DTYPE_BYTES[t.dtype], 0);
  writeFileAtomic(join(dir, 'model.safetensors.index.json'), [enc.encode(JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }, null, 2))]);
}
