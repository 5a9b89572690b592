// Real-size LLaMA shapes on this machine: qalora next to llama.cpp (node-llama-cpp) in the same run.
//
//   npx tsx bench/scale.ts [--shapes tinyllama,llama7b] [--threads 2] [--prompt-tokens 128] [--decode 32]
//                          [--train llama7b | --no-train] [--cache DIR] [--json] [--make-only]
//
// 1. Makes a LLaMA-shaped GGUF per shape with random weights (Q4_1 projections, embedding and untied classifier,
//    F32 norms of 1, the LLaMA-2 tokenizer in the metadata), written tensor by tensor with the project's own
//    writer and cached under bench/.cache/ (keyed by every parameter that changes the bytes).
// 2. For each file, one llama.cpp run and one `qalora generate` run, each in its own process (so each peak RSS is
//    its own; /usr/bin/time -v reads it): load time, peak RSS and its ratio to the file, time to first token,
//    prefill and decode tokens/s on the same prompt ids, greedy.
// 3. A 2-step `qalora train` on the --train shape (sequence 128, batch 1, the inferred spec: rank 64): wall time
//    and peak RSS. The machine has no swap, so "does not swap" means "does not get killed".
// Measurements run one after another: never two big processes at once on 2 cores.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { GGUF_PROJECTION } from '../runtime/formats/gguf-llama.ts';
import { GgmlType, GgufValueType as T, writeGguf, type GgufWriteKV, type GgufWriteTensor } from '../runtime/formats/gguf.ts';
import { vocabFromTokenizer } from '../runtime/export/gguf.ts';
import { readSentencePieceModel } from '../runtime/tokenizer/spm-model.ts';
import { f16BitsToF32, f32ToF16Bits } from '../runtime/safetensors.ts';
import { fixture } from '../test/fixtures.ts';

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = join(HERE, '..');

interface Shape { dim: number; hidden: number; layers: number; heads: number; kvHeads: number; vocab: number; context: number }
const SHAPES: Record<string, Shape> = {
  tinyllama: { dim: 2048, hidden: 5632, layers: 22, heads: 32, kvHeads: 4, vocab: 32000, context: 2048 },
  llama7b: { dim: 4096, hidden: 11008, layers: 32, heads: 32, kvHeads: 32, vocab: 32000, context: 4096 },
};
// Bump when the bytes a shape produces change (the cache key includes it).
const GENERATOR_VERSION = 1;
const SEED = 1234;

// ---- Child mode: one llama.cpp measurement in its own process -------------------------------------------------

if (process.argv[2] === '--child-llamacpp') {
  // Markers on stdout are timestamped by the parent (load and first token are measured the same way for both
  // tools); the in-process prefill/decode times come back as JSON on the last line.
  const [file, threads, decode, ids] = [process.argv[3], Number(process.argv[4]), Number(process.argv[5]), JSON.parse(process.argv[6]) as number[]];
  const { getLlama } = await import('node-llama-cpp');
  const llama = await getLlama({ gpu: false, build: 'never', logLevel: 'error' as never });
  const model = await llama.loadModel({ modelPath: file });
  // A context just big enough for the run: llama.cpp's KV cache is then small, like a real short chat.
  const ctx = await model.createContext({ contextSize: 512, threads });
  const seq = ctx.getSequence();
  process.stdout.write('READY\n');
  const t0 = performance.now();
  let t1 = 0;
  const made: number[] = [];
  for await (const tok of seq.evaluate(ids as never, { temperature: 0 } as never)) {
    if (made.push(tok as number) === 1) { t1 = performance.now(); process.stdout.write('FIRST\n'); }
    if (made.length >= decode) break;
  }
  const t2 = performance.now();
  process.stdout.write(JSON.stringify({ promptTokens: ids.length, newTokens: made.length, tokens: made, prefillSeconds: (t1 - t0) / 1000, decodeSeconds: (t2 - t1) / 1000 }) + '\n');
  await ctx.dispose();
  await model.dispose();
  process.exit(0);
}

// ---- Options ------------------------------------------------------------------------------------------------

const { values: o } = parseArgs({
  options: {
    shapes: { type: 'string', default: 'tinyllama' },
    threads: { type: 'string', default: '2' },
    'prompt-tokens': { type: 'string', default: '128' },
    decode: { type: 'string', default: '32' },
    train: { type: 'string' },
    'no-train': { type: 'boolean', default: false },
    'train-data': { type: 'string', default: fixture('data/tinystories/tinystories-5-stories.txt') },
    cache: { type: 'string', default: join(HERE, '.cache') },
    tokenizer: { type: 'string', default: fixture('models/llama2-tokenizer/tokenizer.model') },
    json: { type: 'boolean', default: false },
    'make-only': { type: 'boolean', default: false },
  },
});
const shapes = o.shapes!.split(',').map((s) => s.trim()).filter(Boolean);
for (const s of shapes) if (!SHAPES[s]) throw new Error(`--shapes: unknown shape '${s}' (${Object.keys(SHAPES).join(', ')})`);
const threads = Number(o.threads);
const promptTokens = Number(o['prompt-tokens']);
const decode = Number(o.decode);
// Training runs on the largest shape asked for unless told otherwise (the issue's target: 7B on this machine).
const trainShape = o['no-train'] ? undefined : (o.train ?? (shapes.includes('llama7b') ? 'llama7b' : undefined));
if (trainShape && !SHAPES[trainShape]) throw new Error(`--train: unknown shape '${trainShape}'`);

// ---- The synthetic GGUF ---------------------------------------------------------------------------------------

/** xorshift32 from a string: per-tensor streams, so a file is the same bytes on every machine. */
function rng(key: string): () => number {
  let s = createHash('sha256').update(`${SEED}/${key}`).digest().readUInt32LE(0) || 1;
  return () => { s ^= s << 13; s ^= s >>> 17; s ^= s << 5; return s >>> 0; };
}

/**
 * Q4_1 blocks (fp16 d, fp16 m, 16 bytes of nibbles per 32 weights) for an [out, in] weight: random nibbles,
 * d ≈ 1/(4.6·√in) so that y = W·x has about unit scale for a unit-RMS x (uniform q on 0..15 has std ≈ 4.6),
 * and m = −7.5·d so every weight is centred: activations stay finite through 32 layers.
 */
function q41Blocks(name: string, out: number, inF: number): Uint8Array {
  const blocks = (out * inF) / 32;
  const bytes = new Uint8Array(blocks * 20);
  const next = rng(name);
  const words = new Uint32Array(bytes.buffer);
  for (let i = 0; i < words.length; i++) words[i] = next();
  // 64 (d, m) pairs, d spread over ±25%: one fp16 conversion per pair, not per block.
  const base = 1 / (4.6 * Math.sqrt(inF));
  const dm = new Uint16Array(128);
  for (let k = 0; k < 64; k++) {
    const d = f32ToF16Bits(base * (0.75 + (0.5 * k) / 63));
    dm[2 * k] = d;
    dm[2 * k + 1] = f32ToF16Bits(-7.5 * f16BitsToF32(d));
  }
  const h = new Uint16Array(bytes.buffer);
  for (let b = 0; b < blocks; b++) {
    const k = (words[b * 5 + 2] & 63) * 2; // a nibble word of this block picks the pair
    h[b * 10] = dm[k];
    h[b * 10 + 1] = dm[k + 1];
  }
  return bytes;
}

function ones(n: number): Uint8Array {
  return new Uint8Array(new Float32Array(n).fill(1).buffer);
}

/** The file for a shape: made once, then reused while every parameter that changes its bytes is the same. */
function syntheticGguf(shapeName: string): string {
  const c = SHAPES[shapeName];
  const tokBytes = readFileSync(o.tokenizer!);
  const key = createHash('sha256').update(JSON.stringify({ c, GENERATOR_VERSION, SEED })).update(tokBytes).digest('hex').slice(0, 12);
  const path = join(o.cache!, `${shapeName}-q4_1-${key}.gguf`);
  if (existsSync(path)) return path;

  const tok = readSentencePieceModel(o.tokenizer!);
  if (tok.vocabSize !== c.vocab) throw new Error(`${o.tokenizer}: ${tok.vocabSize} tokens, the shape needs ${c.vocab}`);
  const vocab = vocabFromTokenizer(tok);
  // The same keys as runtime/export/gguf.ts's buildGguf writes for a Q4_1 model (file_type 3 = MOSTLY_Q4_1).
  const kvs: GgufWriteKV[] = [
    ['general.architecture', T.STRING, 'llama'],
    ['general.name', T.STRING, `qalora-bench-${shapeName}-random`],
    ['general.alignment', T.U32, 32],
    ['general.file_type', T.U32, 3],
    ['general.quantization_version', T.U32, 2],
    ['llama.vocab_size', T.U32, c.vocab],
    ['llama.context_length', T.U32, c.context],
    ['llama.embedding_length', T.U32, c.dim],
    ['llama.block_count', T.U32, c.layers],
    ['llama.feed_forward_length', T.U32, c.hidden],
    ['llama.rope.dimension_count', T.U32, c.dim / c.heads],
    ['llama.attention.head_count', T.U32, c.heads],
    ['llama.attention.head_count_kv', T.U32, c.kvHeads],
    ['llama.attention.layer_norm_rms_epsilon', T.F32, 1e-5],
    ['llama.rope.freq_base', T.F32, 10000],
    ['tokenizer.ggml.model', T.STRING, 'llama'],
    ['tokenizer.ggml.tokens', T.ARRAY, vocab.tokens, T.STRING],
    ['tokenizer.ggml.scores', T.ARRAY, Float32Array.from(vocab.scores), T.F32],
    ['tokenizer.ggml.token_type', T.ARRAY, Int32Array.from(vocab.types), T.I32],
    ['tokenizer.ggml.bos_token_id', T.U32, vocab.bos],
    ['tokenizer.ggml.eos_token_id', T.U32, vocab.eos],
    ['tokenizer.ggml.add_bos_token', T.BOOL, true],
    ['tokenizer.ggml.add_eos_token', T.BOOL, false],
  ];
  if (vocab.unk !== undefined) kvs.push(['tokenizer.ggml.unknown_token_id', T.U32, vocab.unk]);

  // Every tensor is made when the writer reaches it (read()), so memory holds one tensor, not the file.
  const q41 = (name: string, out: number, inF: number): GgufWriteTensor => ({ name, dims: [inF, out], type: GgmlType.Q4_1, read: () => q41Blocks(name, out, inF) });
  const norm = (name: string): GgufWriteTensor => ({ name, dims: [c.dim], type: GgmlType.F32, read: () => ones(c.dim) });
  const kvDim = (c.dim / c.heads) * c.kvHeads;
  const outs = { q: c.dim, k: kvDim, v: kvDim, o: c.dim, gate: c.hidden, up: c.hidden, down: c.dim };
  const ins = { q: c.dim, k: c.dim, v: c.dim, o: c.dim, gate: c.dim, up: c.dim, down: c.hidden };
  const tensors: GgufWriteTensor[] = [q41('token_embd.weight', c.vocab, c.dim)];
  for (let l = 0; l < c.layers; l++) {
    tensors.push(norm(`blk.${l}.attn_norm.weight`), norm(`blk.${l}.ffn_norm.weight`));
    for (const p of ['q', 'k', 'v', 'o', 'gate', 'up', 'down'] as const) tensors.push(q41(`blk.${l}.${GGUF_PROJECTION[p]}.weight`, outs[p], ins[p]));
  }
  tensors.push(norm('output_norm.weight'), q41('output.weight', c.vocab, c.dim));

  mkdirSync(o.cache!, { recursive: true });
  const t0 = performance.now();
  const size = writeGguf(path, kvs, tensors);
  log(`wrote ${path}: ${gb(size)} GB in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  return path;
}

// ---- Measuring a child process --------------------------------------------------------------------------------

interface ChildRun { code: number; wall: number; peakRss: number; stdout: string; stderr: string; marks: Map<string, number> }

const TIME = existsSync('/usr/bin/time') ? '/usr/bin/time' : undefined;

/**
 * Runs a command under /usr/bin/time -v (its "Maximum resident set size" is the child's own peak), timestamping
 * stdout events from the spawn: `mark(text so far)` names the moments to keep (first byte, a marker line, …).
 */
function measure(cmd: string[], env: NodeJS.ProcessEnv, mark: (stdout: string, marks: Map<string, number>, t: number) => void): Promise<ChildRun> {
  return new Promise((resolve, reject) => {
    const argv = TIME ? [TIME, '-v', ...cmd] : cmd;
    const t0 = performance.now();
    const child = spawn(argv[0], argv.slice(1), { cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '', stderr = '';
    const marks = new Map<string, number>();
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); mark(stdout, marks, (performance.now() - t0) / 1000); });
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    child.on('error', reject);
    child.on('close', (code) => {
      const wall = (performance.now() - t0) / 1000;
      const kb = /Maximum resident set size \(kbytes\): (\d+)/.exec(stderr);
      resolve({ code: code ?? -1, wall, peakRss: kb ? Number(kb[1]) * 1024 : NaN, stdout, stderr, marks });
    });
  });
}

/** The child's own error output, without /usr/bin/time's report. */
function childErrors(r: ChildRun): string {
  return r.stderr.replace(/\n?\s*Command (being timed|exited)[\s\S]*$/, '').trim().split('\n').slice(-15).join('\n');
}

interface Row { tool: string; text?: string; load: number; peakRss: number; fileRatio: number; ttft: number; prefill: number; decode: number; promptTokens: number; newTokens: number; error?: string }

async function runLlamaCpp(file: string, ids: number[]): Promise<Row> {
  const r = await measure(
    [process.execPath, '--import', 'tsx', fileURLToPath(import.meta.url), '--child-llamacpp', file, String(threads), String(decode), JSON.stringify(ids)],
    {},
    (out, marks, t) => {
      for (const m of ['READY', 'FIRST']) if (!marks.has(m) && out.includes(`${m}\n`)) marks.set(m, t);
    },
  );
  const size = statSync(file).size;
  const last = r.stdout.trim().split('\n').pop() ?? '';
  if (r.code !== 0 || !last.startsWith('{')) return failed('llama.cpp', `exit ${r.code}: ${childErrors(r)}`);
  const j = JSON.parse(last) as { promptTokens: number; newTokens: number; tokens: number[]; prefillSeconds: number; decodeSeconds: number };
  return {
    tool: 'llama.cpp', text: readSentencePieceModel(o.tokenizer!).decode(j.tokens), load: r.marks.get('READY')!, peakRss: r.peakRss, fileRatio: r.peakRss / size, ttft: r.marks.get('FIRST')!,
    prefill: j.promptTokens / j.prefillSeconds, decode: j.newTokens / j.decodeSeconds, promptTokens: j.promptTokens, newTokens: j.newTokens,
  };
}

async function runQalora(file: string, prompt: string): Promise<Row> {
  // generate echoes the prompt before its prefill (llama2.c's run does), so its first stdout byte is "loaded",
  // and the first byte past the echoed prompt is the first new token.
  const echoed = prompt.trim().length;
  const r = await measure(
    [process.execPath, 'bin/qalora.mjs', 'generate', '--model', file, '--prompt', prompt, '--max-tokens', String(decode), '--temperature', '0', '--seed', '1'],
    { QALORA_THREADS: String(threads) },
    (out, marks, t) => {
      if (!marks.has('load') && out.length > 0) marks.set('load', t);
      if (!marks.has('first') && out.trimStart().length > echoed) marks.set('first', t);
    },
  );
  const size = statSync(file).size;
  const speed = /prefill: (\d+) tokens, ([\d.]+) tok\/s; decode: (\d+) tokens, ([\d.]+) tok\/s/.exec(r.stderr);
  if (r.code !== 0 || !speed) return failed('qalora', `exit ${r.code}: ${childErrors(r)}`);
  const own = /peak memory: (.*) resident/.exec(r.stderr);
  if (own) log(`qalora's own report: peak memory ${own[1]}`);
  return {
    tool: 'qalora', text: r.stdout.trimStart().slice(echoed), load: r.marks.get('load') ?? NaN, peakRss: r.peakRss, fileRatio: r.peakRss / size, ttft: r.marks.get('first') ?? NaN,
    prefill: Number(speed[2]), decode: Number(speed[4]), promptTokens: Number(speed[1]), newTokens: Number(speed[3]),
  };
}

function failed(tool: string, error: string): Row {
  return { tool, load: NaN, peakRss: NaN, fileRatio: NaN, ttft: NaN, prefill: NaN, decode: NaN, promptTokens: 0, newTokens: 0, error };
}

/** A TinyStories prefix of exactly `n` tokens with BOS (the same ids go to llama.cpp; qalora encodes the text). */
function promptOf(n: number): { text: string; ids: number[] } {
  const tok = readSentencePieceModel(o.tokenizer!);
  const words = readFileSync(fixture('data/tinystories/tinystories-5-stories.txt'), 'utf8').split(/\s+/).filter(Boolean);
  let text = '', ids = [tok.bos];
  for (const w of words) {
    const t = text ? `${text} ${w}` : w;
    const e = tok.encode(t, { bos: true });
    if (e.length > n) break;
    text = t;
    ids = e;
  }
  return { text, ids };
}

// ---- Output ---------------------------------------------------------------------------------------------------

function log(s: string): void { process.stderr.write(s + '\n'); }
function gb(n: number): string { return (n / 1e9).toFixed(2); }
const f = (v: number, d = 2) => (Number.isFinite(v) ? v.toFixed(d) : '-');

function table(file: string, rows: Row[], before: string): string {
  const [a, b] = rows; // llama.cpp, qalora
  const ratio = (x: number, y: number) => (Number.isFinite(x / y) ? `${(x / y).toFixed(2)}×` : '-');
  const lines = [
    `| ${o.threads} threads | llama.cpp | qalora | qalora / llama.cpp |`,
    '|---|---:|---:|---:|',
    `| load (s, from spawn) | ${f(a.load)} | ${f(b.load)} | ${ratio(b.load, a.load)} |`,
    `| peak RSS (GB) | ${gb(a.peakRss)} | ${gb(b.peakRss)} | ${ratio(b.peakRss, a.peakRss)} |`,
    `| peak RSS / file size | ${f(a.fileRatio)} | ${f(b.fileRatio)} | |`,
    `| first token (s, from spawn) | ${f(a.ttft)} | ${f(b.ttft)} | ${ratio(b.ttft, a.ttft)} |`,
    `| prefill (tok/s, ${a.promptTokens || b.promptTokens} tokens) | ${f(a.prefill, 1)} | ${f(b.prefill, 1)} | ${ratio(b.prefill, a.prefill)} |`,
    `| decode (tok/s, ${a.newTokens || b.newTokens} tokens) | ${f(a.decode, 1)} | ${f(b.decode, 1)} | ${ratio(b.decode, a.decode)} |`,
  ];
  for (const r of rows) if (r.error) lines.push('', `${r.tool} failed: ${r.error}`);
  return `${relative(ROOT, file)} (${gb(statSync(file).size)} GB); load average before/after: ${before} / ${busy()}\n\n${lines.join('\n')}`;
}

// ---- Main -----------------------------------------------------------------------------------------------------

if (o['make-only']) {
  for (const s of new Set([...shapes, ...(trainShape ? [trainShape] : [])])) log(syntheticGguf(s));
  process.exit(0);
}
const report: Record<string, unknown> = { threads, promptTokens, decode };
// Other jobs on a shared 2-core machine slow both tools (llama.cpp's spinning threads far more): say how busy it was.
const busy = () => loadavg().map((x) => x.toFixed(1)).join(' ');
const prompt = promptOf(promptTokens);
log(`prompt: ${prompt.ids.length} tokens (BOS included); ${TIME ? 'peak RSS from /usr/bin/time -v' : 'no /usr/bin/time: peak RSS unknown'}`);
for (const s of shapes) {
  const file = syntheticGguf(s);
  const before = busy();
  log(`${s}: llama.cpp … (load average ${busy()})`);
  const cpp = await runLlamaCpp(file, prompt.ids);
  log(`${s}: qalora generate …`);
  const ours = await runQalora(file, prompt.text);
  // Random weights: the text is noise, but the two greedy continuations should start alike (near-ties aside).
  for (const r of [cpp, ours]) log(`${r.tool} continuation: ${JSON.stringify(r.text?.slice(0, 80))}`);
  report[s] = { file, size: statSync(file).size, llamaCpp: cpp, qalora: ours };
  if (!o.json) process.stdout.write(`\n## ${s}: ${Object.entries(SHAPES[s]).map(([k, v]) => `${k} ${v}`).join(', ')}\n\n${table(file, [cpp, ours], before)}\n`);
}

if (trainShape) {
  const file = syntheticGguf(trainShape);
  const out = mkdtempSync(join(tmpdir(), 'qalora-scale-train-'));
  log(`${trainShape}: qalora train (2 steps) …`);
  // No held-out windows: the run measures the two training steps, not a validation pass over the 7B model.
  const r = await measure(
    [process.execPath, 'bin/qalora.mjs', 'train', '--model', file, '--data', o['train-data']!, '--out', out,
      '--seq-len', '128', '--batch-size', '1', '--max-steps', '2', '--val-fraction', '0', '--eval-every', '0', '--quiet'],
    { QALORA_THREADS: String(threads) }, () => {},
  );
  // Per-step loss and time from the run's own metrics log; the load is the wall time the steps do not account for.
  const metrics = join(out, 'metrics.jsonl');
  const steps = existsSync(metrics)
    ? readFileSync(metrics, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l) as { kind: string; step: number; loss: number; elapsed: number })
      .filter((m) => m.kind === 'train')
    : [];
  rmSync(out, { recursive: true, force: true });
  const res = { code: r.code, wallSeconds: r.wall, peakRss: r.peakRss, fileRatio: r.peakRss / statSync(file).size, steps, error: r.code === 0 ? undefined : childErrors(r) };
  report.train = { shape: trainShape, ...res };
  if (!o.json) {
    let prev = 0;
    const lines = steps.map((m) => { const l = `  step ${m.step}: loss ${m.loss.toFixed(4)}, ${(m.elapsed - prev).toFixed(1)} s`; prev = m.elapsed; return l; });
    process.stdout.write(`\n## qalora train on ${trainShape} (2 steps, sequence 128, batch 1, inferred spec: rank 64)\n\n` +
      `wall ${f(r.wall, 1)} s (load included), peak RSS ${gb(r.peakRss)} GB (${f(res.fileRatio)}× the file), exit ${r.code}\n` +
      lines.map((l) => l + '\n').join('') + (res.error ? `error:\n${res.error}\n` : ''));
  }
}
if (o.json) process.stdout.write(JSON.stringify(report, null, 2) + '\n');
