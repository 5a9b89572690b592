// Fine-tuning speed of qalora beside PyTorch (issue 10, item 4): the same QA-LoRA LLaMA — torch_qalora.py's
// `small` shape (dim 512, hidden 1376, 8 layers, 8 heads, vocab 32000), 4-bit g32 base, rank 16 alpha 16 on all
// seven projections, no dropout, AdamW on the adapters — at the same thread count, sequence and batch, plus
// `qalora train --profile`'s per-op breakdown of qalora's step.
//
//   npx tsx bench/train.ts [--threads 2] [--steps 4] [--rounds 3] [--seq 256] [--batch 4] [--settle 30] [--json]
//
// PyTorch is Debian's python3-torch 1.13 with libopenblas0-pthread (without it torch runs a reference BLAS, 11×
// slower): installed here when missing (apt-get, as root) — the benchmark's own dependency, not CI's. Both sides
// time `steps` steps after one warm-up step and report the median (torch_qalora.py's own rule). qalora's model is
// bench/synthetic-gguf.ts's `small` file (Q4_1 blocks = the 4-bit g32 base exactly); PyTorch draws its weights
// itself and holds the base dequantized in fp32 (its classifier and embedding are fp32; ours are the file's Q4_1).
// The two sides alternate, `rounds` times (qalora, PyTorch, qalora, …), and each round's ratio is taken from its own
// pair: on a shared machine either side's step moves by a third between minutes (this one: PyTorch 4.1–5.6 s,
// qalora 1.8–2.8 s on the same code), so a ratio of two runs minutes apart measures the machine.
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { parseArgs } from 'node:util';
import type { ProfileReport } from '../runtime/model/profile.ts';
import { childFailed, lastJson, loadLabel, quietMoment, ROOT, runChild } from './sequential.ts';
import { SHAPES, syntheticGguf } from './synthetic-gguf.ts';

const { values: o } = parseArgs({
  options: {
    threads: { type: 'string', default: '2' },
    steps: { type: 'string', default: '4' },
    rounds: { type: 'string', default: '3' },
    seq: { type: 'string', default: '256' },
    batch: { type: 'string', default: '4' },
    rank: { type: 'string', default: '16' },
    settle: { type: 'string', default: '30' },
    torch: { type: 'string', default: join(ROOT, '..', 'shared', 'bench', 'torch_qalora.py') },
    data: { type: 'string', default: join(ROOT, 'assets', 'demo', 'tinyshakespeare.txt') },
    json: { type: 'boolean', default: false },
  },
});
const threads = Number(o.threads), steps = Number(o.steps), seq = Number(o.seq), batch = Number(o.batch), rank = Number(o.rank);
const settle = Number(o.settle), rounds = Number(o.rounds);
const log = (s: string) => process.stderr.write(s + '\n');
const PYTHON = '/usr/bin/python3';

// ---- PyTorch, installed when missing ----------------------------------------------------------------------------

async function hasTorch(): Promise<boolean> {
  const torch = await runChild([PYTHON, '-c', 'import torch']).catch(() => ({ code: -1 }));
  const blas = await runChild(['dpkg', '-s', 'libopenblas0-pthread']).catch(() => ({ code: -1 }));
  return torch.code === 0 && blas.code === 0;
}

async function ensureTorch(): Promise<void> {
  if (await hasTorch()) return;
  const pkgs = ['python3-torch', 'libopenblas0-pthread'];
  if (process.getuid?.() !== 0) throw new Error(`PyTorch is missing: run \`apt-get install -y ${pkgs.join(' ')}\` as root`);
  log(`installing ${pkgs.join(', ')} (apt-get) …`);
  let r = await runChild(['apt-get', 'install', '-y', ...pkgs], { DEBIAN_FRONTEND: 'noninteractive' });
  if (r.code !== 0) { // a fresh machine's package lists may be empty
    await runChild(['apt-get', 'update']);
    r = await runChild(['apt-get', 'install', '-y', ...pkgs], { DEBIAN_FRONTEND: 'noninteractive' });
  }
  if (r.code !== 0 || !(await hasTorch())) throw childFailed(r, `apt-get install ${pkgs.join(' ')}`);
}

interface TorchResult { engine: string; step_s_median: number; train_tok_s: number; tokens_per_step: number; loss: number }

function runTorch(): Promise<TorchResult> {
  // torch.set_num_threads covers its own pool; OpenBLAS (pthread build) and OpenMP read these.
  const env = { OPENBLAS_NUM_THREADS: String(threads), OMP_NUM_THREADS: String(threads) };
  return runChild([PYTHON, o.torch!, '--shape', 'small', '--seq', String(seq), '--batch', String(batch), '--steps', String(steps),
    '--threads', String(threads), '--rank', String(rank), '--bits', '4', '--group', '32'], env).then((r) => lastJson<TorchResult>(r, 'torch_qalora.py'));
}

// ---- qalora -----------------------------------------------------------------------------------------------------

/** torch_qalora.py's model as a spec over the `small` file's Q4_1 blocks (its QALoRALinear has no dropout). */
function smallSpec(dir: string): string {
  const c = SHAPES.small;
  const path = join(dir, `bench_small_r${rank}.qal`);
  writeFileSync(path, `# bench/train.ts: ../shared/bench/torch_qalora.py's 'small' shape and adapters\nmodel bench_small_r${rank} {\n` +
    `  llama { dim ${c.dim}  hidden ${c.hidden}  layers ${c.layers}  heads ${c.heads}  kv_heads ${c.kvHeads}  vocab ${c.vocab}  context ${c.context} }\n` +
    `  qalora { bits 4  group 32  rank ${rank}  alpha 16  dropout 0  pool mean  dtype fp32 }\n  adapters all_linear\n  target cpu\n}\n`);
  return path;
}

interface QaloraResult { stepSecondsMedian: number; tokS: number; loss: number; profile: ProfileReport }

async function runQalora(file: string, spec: string): Promise<QaloraResult> {
  const out = mkdtempSync(join(tmpdir(), 'qalora-bench-train-'));
  try {
    const r = await runChild([process.execPath, 'bin/qalora.mjs', 'train', '--model', file, '--spec', spec, '--data', o.data!, '--out', out,
      '--seq-len', String(seq), '--batch-size', String(batch), '--max-steps', String(steps + 1), '--val-fraction', '0', '--eval-every', '0',
      '--save-every', '0', '--quiet', '--profile'], { QALORA_THREADS: String(threads) });
    const metrics = join(out, 'metrics.jsonl');
    if (r.code !== 0 || !existsSync(metrics)) throw childFailed(r, 'qalora train');
    const train = readFileSync(metrics, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { kind: string; loss: number; elapsed: number })
      .filter((m) => m.kind === 'train');
    // Per-step seconds from the cumulative elapsed; the first step is the warm-up, as on PyTorch's side.
    const times = train.map((m, i) => m.elapsed - (i ? train[i - 1].elapsed : 0)).slice(1).sort((a, b) => a - b);
    const med = times[Math.floor(times.length / 2)];
    const profile = JSON.parse(readFileSync(join(out, 'profile.json'), 'utf8')) as ProfileReport;
    return { stepSecondsMedian: med, tokS: (seq * batch) / med, loss: train[train.length - 1].loss, profile };
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
}

function profileTable(p: ProfileReport): string {
  return ['| op | ms/step | % of step |', '|---|---:|---:|',
    ...p.rows.map((r) => `| ${r.name} | ${r.msPerStep.toFixed(1)} | ${r.percent.toFixed(1)} |`),
    `| step (mean of all ${p.steps}, warm-up included) | ${p.msPerStep.toFixed(1)} | 100 |`].join('\n');
}

// ---- Main -----------------------------------------------------------------------------------------------------

await ensureTorch();
const file = syntheticGguf('small');
const cache = join(ROOT, 'bench', '.cache');
mkdirSync(cache, { recursive: true });
const spec = smallSpec(cache);
log(`qalora warm-up (builds the spec's addon if needed, tokenizes the data once) …`);
const warmDir = mkdtempSync(join(tmpdir(), 'qalora-bench-warm-'));
const warm = await runChild([process.execPath, 'bin/qalora.mjs', 'train', '--model', file, '--spec', spec, '--data', o.data!, '--out', warmDir,
  '--seq-len', String(seq), '--batch-size', '1', '--max-steps', '1', '--val-fraction', '0', '--eval-every', '0', '--quiet']);
rmSync(warmDir, { recursive: true, force: true });
if (warm.code !== 0) throw childFailed(warm, 'qalora warm-up');

interface Round { qalora: QaloraResult & { load: number[] }; pytorch: TorchResult & { load: number[] }; ratio: number }
const done: Round[] = [];
for (let i = 0; i < rounds; i++) {
  const loadQ = await quietMoment(`qalora train, ${threads} thread(s), round ${i + 1} of ${rounds}`, settle);
  const ours = await runQalora(file, spec);
  const loadT = await quietMoment(`PyTorch, ${threads} thread(s), round ${i + 1} of ${rounds}`, settle);
  const torch = await runTorch();
  done.push({ qalora: { ...ours, load: loadQ }, pytorch: { ...torch, load: loadT }, ratio: ours.tokS / torch.train_tok_s });
}
const byRatio = [...done].sort((a, b) => a.ratio - b.ratio);
const mid = byRatio[Math.floor(byRatio.length / 2)];

const report = { threads, steps, seq, batch, rank, rounds: done, medianRatio: mid.ratio };
if (o.json) {
  process.stdout.write(JSON.stringify(report, null, 2) + '\n');
} else {
  const engine = done[0].pytorch.engine;
  const rows = done.map((r, i) =>
    `| ${i + 1} | ${r.pytorch.step_s_median.toFixed(3)} | ${r.qalora.stepSecondsMedian.toFixed(3)} | ${r.pytorch.train_tok_s.toFixed(1)} | ` +
    `${r.qalora.tokS.toFixed(1)} | ${r.ratio.toFixed(2)}× | ${loadLabel(r.pytorch.load)} / ${loadLabel(r.qalora.load)} |`);
  process.stdout.write(`\n## fine-tuning, shape small (${relative(ROOT, file)}), ${threads} thread(s), ${batch} × ${seq} tokens per step, rank ${rank}\n\n` +
    `Steps: the median of ${steps} after a warm-up, per side and round; the sides alternate, qalora first.\n\n` +
    `| round | ${engine} step (s) | qalora step (s) | ${engine} tokens/s | qalora tokens/s | qalora / PyTorch | load average before (PyTorch / qalora) |\n` +
    `|---:|---:|---:|---:|---:|---:|---|\n${rows.join('\n')}\n\n` +
    `**qalora / PyTorch, median of ${done.length} rounds: ${mid.ratio.toFixed(2)}×** (rounds ${byRatio[0].ratio.toFixed(2)}–${byRatio[byRatio.length - 1].ratio.toFixed(2)}×)\n\n` +
    `qalora's step in the median round, \`qalora train --profile\`:\n\n${profileTable(mid.qalora.profile)}\n`);
}
