// Quantizing a float checkpoint bigger than any one buffer: a LLaMA-2-7B-shaped Hugging Face directory in two
// float16 safetensors shards of ≈ 6.7 GB each, quantized by `qalora quantize --spec specs/llama2-7b.qal` in a
// child process whose peak resident memory is compared with what a tensor-at-a-time quantizer needs: the
// quantized model plus one tensor in fp32 (the bound allows two).
//
// The shards are sparse (header written, the rest a hole that reads as zeros): the loader reads all 13.5 GB as it
// would real weights, at no disk cost. Zeros quantize to α = 0, which costs the kernels the same time.
//
//   npx tsx bench/quantize-sharded.ts [--layers 32] [--keep]
import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, ftruncateSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { hfConfigJson } from '../runtime/formats/hf.ts';
import { formatBytes } from '../runtime/progress.ts';

const repo = resolve(import.meta.dirname, '..');
const shared = process.env.QALORA_FIXTURES ?? resolve(repo, '..', 'shared');
const args = process.argv.slice(2);
const layers = Number(args[args.indexOf('--layers') + 1] || 32) || 32;
const keep = args.includes('--keep');

const c = { dim: 4096, hidden: 11008, layers, heads: 32, kvHeads: 32, vocab: 32000, context: 4096, ropeTheta: 10000, normEps: 1e-5, tiedClassifier: false };
type Entry = { name: string; shape: number[] };

function tensorsOf(l: number): Entry[] {
  const p = `model.layers.${l}`;
  return [
    ...['q_proj', 'k_proj', 'v_proj', 'o_proj'].map((n) => ({ name: `${p}.self_attn.${n}.weight`, shape: [c.dim, c.dim] })),
    { name: `${p}.mlp.gate_proj.weight`, shape: [c.hidden, c.dim] },
    { name: `${p}.mlp.up_proj.weight`, shape: [c.hidden, c.dim] },
    { name: `${p}.mlp.down_proj.weight`, shape: [c.dim, c.hidden] },
    { name: `${p}.input_layernorm.weight`, shape: [c.dim] },
    { name: `${p}.post_attention_layernorm.weight`, shape: [c.dim] },
  ];
}

/** A sparse F16 safetensors shard: the header, then a hole of the data's size. Returns its data bytes. */
function sparseShard(path: string, entries: Entry[]): number {
  const header: Record<string, unknown> = {};
  let off = 0;
  for (const e of entries) {
    const bytes = e.shape.reduce((a, b) => a * b, 1) * 2;
    header[e.name] = { dtype: 'F16', shape: e.shape, data_offsets: [off, off + bytes] };
    off += bytes;
  }
  let json = Buffer.from(JSON.stringify(header));
  json = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, 0x20)]);
  const fd = openSync(path, 'w');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeSync(fd, len);
  writeSync(fd, json);
  ftruncateSync(fd, 8 + json.length + off);
  closeSync(fd);
  return off;
}

const dir = mkdtempSync(join(tmpdir(), 'qalora-sharded-'));
try {
  const half = Math.ceil(layers / 2);
  const first: Entry[] = [{ name: 'model.embed_tokens.weight', shape: [c.vocab, c.dim] }];
  for (let l = 0; l < half; l++) first.push(...tensorsOf(l));
  const second: Entry[] = [];
  for (let l = half; l < layers; l++) second.push(...tensorsOf(l));
  second.push({ name: 'model.norm.weight', shape: [c.dim] }, { name: 'lm_head.weight', shape: [c.vocab, c.dim] });
  const shards: Array<[string, Entry[]]> = [['model-00001-of-00002.safetensors', first], ['model-00002-of-00002.safetensors', second]];
  const weightMap: Record<string, string> = {};
  let total = 0;
  for (const [file, entries] of shards) {
    total += sparseShard(join(dir, file), entries);
    for (const e of entries) weightMap[e.name] = file;
  }
  writeFileSync(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }));
  writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...hfConfigJson(c, 'float16'), model_type: 'llama' }));
  const tok = join(shared, 'models/llama2-tokenizer/tokenizer.model');
  if (!existsSync(tok)) throw new Error(`${tok}: the LLaMA-2 tokenizer fixture is needed (../shared)`);
  symlinkSync(tok, join(dir, 'tokenizer.model'));
  for (const [file] of shards) console.log(`${file}: ${formatBytes(statSync(join(dir, file)).size)} (sparse)`);

  // specs/llama2-7b.qal, with the layer count of this run (--layers makes a quick, smaller check).
  const spec = join(dir, 'llama2-7b.qal');
  writeFileSync(spec, readFileSync(join(repo, 'specs/llama2-7b.qal'), 'utf8').replace(/layers 32/, `layers ${layers}`));
  const out = join(dir, 'base.safetensors');
  const t0 = performance.now();
  const r = spawnSync(process.execPath, [join(repo, 'bin/qalora.mjs'), 'quantize', '--model', dir, '--spec', spec, '--out', out, '--quiet'],
    { encoding: 'utf8', maxBuffer: 1 << 26 });
  const seconds = (performance.now() - t0) / 1000;
  if (r.status !== 0) throw new Error(`qalora quantize failed (${r.status}):\n${r.stderr}`);
  const peak = Number(/peak memory: .*\(([0-9]+) bytes\)/.exec(r.stderr)?.[1]);
  const quantized = statSync(out).size;
  const largestF32 = c.vocab * c.dim * 4;
  console.log(r.stderr.trim());
  console.log(`\n| | bytes |\n|---|---|`);
  console.log(`| float16 checkpoint (2 shards) | ${formatBytes(total)} |`);
  console.log(`| quantized base written | ${formatBytes(quantized)} |`);
  console.log(`| largest tensor in fp32 (embedding, classifier) | ${formatBytes(largestF32)} |`);
  console.log(`| peak RSS of \`qalora quantize\` | ${formatBytes(peak)} = quantized + ${((peak - quantized) / largestF32).toFixed(2)} × largest fp32 tensor |`);
  console.log(`| bound (quantized + 2 × largest fp32) | ${formatBytes(quantized + 2 * largestF32)} — ${peak <= quantized + 2 * largestF32 ? 'met' : 'NOT met'} |`);
  console.log(`\nwall time ${seconds.toFixed(1)} s (build cached or not)`);
} finally {
  if (!keep) rmSync(dir, { recursive: true, force: true });
  else mkdirSync(dir, { recursive: true });
}
