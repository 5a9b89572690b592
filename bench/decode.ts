// Decode and prefill speed of qalora beside llama.cpp (node-llama-cpp 3.21.1) on the same LLaMA-shaped GGUF
// files (bench/synthetic-gguf.ts), at each thread count, plus qalora's serve-style batched decode: N concurrent
// streams through LlamaModel.stepBatch against one stream at the same positions (issue 10, items 2 and 4).
// qalora runs in each --activations mode: fp32 (exact) and int8 (activations quantized per 32 inputs, as llama.cpp).
//
//   npx tsx bench/decode.ts [--shapes tinyllama,llama7b] [--threads 1,2] [--activations fp32,int8] [--prompt-tokens 128]
//                           [--decode 32] [--streams 8] [--batch-steps 16] [--settle 30] [--rounds 3] [--json]
//
// Each thread count is measured --rounds times, llama.cpp and the qalora modes taking turns within a round, and
// every speed is the median over the rounds: on a shared machine one run of either tool can land on a slow minute.
//
// Every measurement runs in a child process of its own, one at a time (bench/sequential.ts): llama.cpp's threads
// spin at a barrier after every op, so a second job on these 2 cores — even our own other tool — collapses its
// speed. The load average is recorded before each one, after waiting up to --settle seconds for it to fall below
// 1.2, with a warning when it did not: such numbers measure the machine.
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { childFailed, lastJson, loadLabel, quietMoment, ROOT, runChild } from './sequential.ts';
import { promptOf, SHAPES, syntheticGguf } from './synthetic-gguf.ts';

const HERE = dirname(fileURLToPath(import.meta.url));

interface QaloraSpeeds { prefill: number; decode: number; promptTokens: number; newTokens: number; single?: number; batched?: number; streams?: number; tokens: number[] }

// ---- Child mode: qalora in its own process (QALORA_THREADS, read once by templates/cpu/threadpool.cpp) -------------

if (process.argv[2] === '--child-qalora') {
  const [file, ids, decode, streams, steps] = [process.argv[3], JSON.parse(process.argv[4]) as number[], Number(process.argv[5]), Number(process.argv[6]), Number(process.argv[7])];
  const activations = (process.argv[8] ?? 'fp32') as 'fp32' | 'int8';
  const { openModel } = await import('../runtime/model/open.ts');
  const { argmax } = await import('../runtime/sampling.ts');
  const { model } = await openModel({ model: file, inferred: { rank: 0 }, activations }); // inference: no adapter, as generate
  process.stdout.write('READY\n');
  if (decode === 0) process.exit(0); // warm-up run: the addon is built, the file's pages are cached

  // Greedy, timed as the llama.cpp child is: prefill = prompt → first token; decode = each later token.
  const s = model.newSession();
  const t0 = performance.now();
  let tok = argmax(s.prefill(ids));
  const t1 = performance.now();
  const tokens = [tok];
  while (tokens.length < decode) tokens.push((tok = argmax(s.step(tok))));
  const t2 = performance.now();
  const r: QaloraSpeeds = { prefill: ids.length / ((t1 - t0) / 1000), decode: (decode - 1) / ((t2 - t1) / 1000), promptTokens: ids.length, newTokens: decode, tokens };

  if (streams > 1) {
    // Streams of different lengths, as a server holds them; one stream at the shortest length is the baseline.
    const open = (n: number) => {
      const session = model.newSession();
      return { session, tok: argmax(session.prefill(ids.slice(0, n))) };
    };
    const base = 16;
    const one = open(base);
    let t = performance.now();
    for (let i = 0; i < steps; i++) one.tok = argmax(one.session.step(one.tok));
    r.single = steps / ((performance.now() - t) / 1000);
    const many = Array.from({ length: streams }, (_, i) => open(base + i));
    let toks = many.map((m) => m.tok);
    t = performance.now();
    for (let i = 0; i < steps; i++) toks = model.stepBatch(many.map((m) => m.session), toks).map(argmax);
    r.batched = (streams * steps) / ((performance.now() - t) / 1000);
    r.streams = streams;
  }
  process.stdout.write(JSON.stringify(r) + '\n');
  process.exit(0);
}

// ---- Options ------------------------------------------------------------------------------------------------

const { values: o } = parseArgs({
  options: {
    shapes: { type: 'string', default: 'tinyllama' },
    threads: { type: 'string', default: '1,2' },
    activations: { type: 'string', default: 'fp32,int8' },
    'prompt-tokens': { type: 'string', default: '128' },
    decode: { type: 'string', default: '32' },
    streams: { type: 'string', default: '8' },
    'batch-steps': { type: 'string', default: '16' },
    settle: { type: 'string', default: '30' },
    rounds: { type: 'string', default: '3' },
    json: { type: 'boolean', default: false },
  },
});
const shapes = o.shapes!.split(',').map((s) => s.trim()).filter(Boolean);
for (const s of shapes) if (!SHAPES[s]) throw new Error(`--shapes: unknown shape '${s}' (${Object.keys(SHAPES).join(', ')})`);
const threadCounts = o.threads!.split(',').map(Number);
type Mode = 'fp32' | 'int8';
const modes = o.activations!.split(',').map((s) => s.trim()) as Mode[];
for (const m of modes) if (m !== 'fp32' && m !== 'int8') throw new Error(`--activations: unknown mode '${m}' (fp32, int8)`);
const decode = Number(o.decode), streams = Number(o.streams), batchSteps = Number(o['batch-steps']), settle = Number(o.settle);

// ---- Children -------------------------------------------------------------------------------------------------

const log = (s: string) => process.stderr.write(s + '\n');
const tsx = (...args: string[]) => [process.execPath, '--import', 'tsx', ...args];

type Ours = (QaloraSpeeds & { load: number[] }) | { error: string; load: number[] };
interface Measured { threads: number; cpp: { prefill: number; decode: number; load: number[] } | { error: string; load: number[] }; ours: Partial<Record<Mode, Ours>> }

async function measure(file: string, ids: number[], threads: number): Promise<Measured> {
  let load = await quietMoment(`llama.cpp, ${threads} thread(s)`, settle);
  let cpp: Measured['cpp'];
  try {
    const r = await runChild(tsx(join(HERE, 'llamacpp-child.ts'), file, String(threads), String(decode), JSON.stringify(ids)));
    const j = lastJson<{ promptTokens: number; newTokens: number; prefillSeconds: number; decodeSeconds: number }>(r, 'llama.cpp');
    // The same definitions as the qalora child: decode counts the tokens after the first.
    cpp = { prefill: j.promptTokens / j.prefillSeconds, decode: (j.newTokens - 1) / j.decodeSeconds, load };
  } catch (e) {
    cpp = { error: (e as Error).message, load };
  }
  const ours: Measured['ours'] = {};
  for (const mode of modes) {
    load = await quietMoment(`qalora (${mode} activations), ${threads} thread(s)`, settle);
    try {
      const r = await runChild(tsx(fileURLToPath(import.meta.url), '--child-qalora', file, JSON.stringify(ids), String(decode), String(streams), String(batchSteps), mode),
        { QALORA_THREADS: String(threads) });
      ours[mode] = { ...lastJson<QaloraSpeeds>(r, `qalora (${mode})`), load };
    } catch (e) {
      ours[mode] = { error: (e as Error).message, load };
    }
  }
  return { threads, cpp, ours };
}

/** A measurement that did not fail, or undefined. */
const ok = <T extends object>(x: T | undefined): Exclude<T, { error: string }> | undefined =>
  (x && !('error' in x) ? (x as Exclude<T, { error: string }>) : undefined);

/** Every speed of the rounds as its median (a failed round is left out; all failed: the last error). */
function medianOf(rounds: Measured[]): Measured {
  const med = (v: number[]) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)];
  const last = rounds[rounds.length - 1];
  const cpps = rounds.map((r) => ok(r.cpp)).filter((c) => c !== undefined);
  const cpp: Measured['cpp'] = cpps.length
    ? { prefill: med(cpps.map((c) => c.prefill)), decode: med(cpps.map((c) => c.decode)), load: last.cpp.load }
    : last.cpp;
  const ours: Measured['ours'] = {};
  for (const m of modes) {
    const qs = rounds.map((r) => ok(r.ours[m])).filter((q) => q !== undefined);
    if (!qs.length) {
      ours[m] = last.ours[m];
      continue;
    }
    const pick = (f: (q: (typeof qs)[number]) => number | undefined) => {
      const v = qs.map(f).filter((x): x is number => x !== undefined);
      return v.length ? med(v) : undefined;
    };
    ours[m] = { ...qs[qs.length - 1], prefill: pick((q) => q.prefill)!, decode: pick((q) => q.decode)!, single: pick((q) => q.single), batched: pick((q) => q.batched) };
  }
  return { threads: last.threads, cpp, ours };
}

// ---- Output ---------------------------------------------------------------------------------------------------

const f = (v: number | undefined, d = 1) => (v !== undefined && Number.isFinite(v) ? v.toFixed(d) : '-');
const ratio = (a?: number, b?: number) => (a !== undefined && b !== undefined && Number.isFinite(a / b) ? `${(a / b).toFixed(2)}×` : '-');

function tables(rows: Measured[]): string {
  const speed = [
    `| threads | llama.cpp prefill | qalora prefill | ratio | llama.cpp decode | ${modes.map((m) => `qalora decode (${m}) | ratio`).join(' | ')} | load avg before (llama.cpp / ${modes.join(' / ')}) |`,
    `|---:|---:|---:|---:|---:|${modes.map(() => '---:|---:|').join('')}---|`,
    ...rows.map((r) => {
      const c = ok(r.cpp), first = ok(r.ours[modes[0]]);
      const dec = modes.map((m) => `${f(ok(r.ours[m])?.decode)} | ${ratio(ok(r.ours[m])?.decode, c?.decode)}`).join(' | ');
      const loads = modes.map((m) => loadLabel(r.ours[m]?.load ?? [])).join(' / ');
      return `| ${r.threads} | ${f(c?.prefill)} | ${f(first?.prefill)} | ${ratio(first?.prefill, c?.prefill)} | ${f(c?.decode)} | ${dec} | ${loadLabel(r.cpp.load)} / ${loads} |`;
    }),
  ];
  const batch = [
    `| threads | activations | qalora 1 stream (tok/s) | ${streams} streams, stepBatch (tok/s, all streams) | ratio |`,
    '|---:|---|---:|---:|---:|',
    ...rows.flatMap((r) => modes.map((m) => {
      const q = ok(r.ours[m]);
      return `| ${r.threads} | ${m} | ${f(q?.single)} | ${f(q?.batched)} | ${ratio(q?.batched, q?.single)} |`;
    })),
  ];
  const failures = rows.flatMap((r) => [['llama.cpp', r.cpp] as const, ...modes.map((m) => [`qalora ${m}`, r.ours[m]] as const)]
    .flatMap(([who, x]) => (x && 'error' in x ? [`${who} failed (${r.threads} threads): ${x.error}`] : [])));
  return [speed.join('\n'), streams > 1 ? batch.join('\n') : '', failures.join('\n')].filter(Boolean).join('\n\n');
}

// ---- Main -----------------------------------------------------------------------------------------------------

const prompt = promptOf(Number(o['prompt-tokens']));
const report: Record<string, unknown> = { promptTokens: prompt.ids.length, decode, streams, batchSteps };
log(`prompt: ${prompt.ids.length} tokens (BOS included); decode ${decode} tokens, greedy; batched: ${streams} streams × ${batchSteps} steps`);
for (const s of shapes) {
  const file = syntheticGguf(s);
  // Untimed warm-up: builds the addon for the file's implied spec if needed and pulls the file into the page
  // cache, so neither lands in (or right before) a measurement.
  log(`${s}: qalora warm-up (build if needed, file into the page cache) …`);
  const warm = await runChild(tsx(fileURLToPath(import.meta.url), '--child-qalora', file, '[1]', '0', '0', '0'));
  if (warm.code !== 0) throw childFailed(warm, 'qalora warm-up');
  const rows: Measured[] = [];
  for (const t of threadCounts) {
    const rounds: Measured[] = [];
    for (let i = 0; i < Number(o.rounds); i++) {
      log(`${s}: ${t} thread(s), round ${i + 1} of ${o.rounds} …`);
      rounds.push(await measure(file, prompt.ids, t));
    }
    rows.push(medianOf(rounds));
  }
  for (const m of modes) {
    const cont = rows.map((r) => { const q = r.ours[m]; return q && !('error' in q) ? q.tokens.slice(0, 8) : []; });
    log(`qalora (${m}) first greedy tokens per thread count (should agree): ${JSON.stringify(cont)}`);
  }
  report[s] = { file, rows };
  if (!o.json) {
    process.stdout.write(`\n## ${s}: ${Object.entries(SHAPES[s]).map(([k, v]) => `${k} ${v}`).join(', ')}\n\n` +
      `${relative(ROOT, file)}; prompt ${prompt.ids.length} tokens, decode ${decode} tokens (tok/s; medians of ${o.rounds} rounds)\n\n${tables(rows)}\n`);
  }
}
if (o.json) process.stdout.write(JSON.stringify(report, null, 2) + '\n');
