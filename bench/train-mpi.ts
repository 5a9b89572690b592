// Training tokens/s on this machine: one process with 1 and with 2 threads, and 2 MPI ranks of 1 thread each
// (`qalora train --nproc 2`), all with the same global batch, on stories260K (INT4, specs/stories260k.qal).
// The number is the trainer's own (tokens of the steps / wall time of the loop: startup and the build excluded).
// Usage: npx tsx bench/train-mpi.ts [--steps 30] [--seq-len 256] [--batch 4]
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { availableParallelism, cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { demoAssets, repoRoot } from '../runtime/assets.ts';
import { findMpirun } from '../runtime/mpi.ts';

const { values } = parseArgs({ options: { steps: { type: 'string', default: '30' }, 'seq-len': { type: 'string', default: '256' }, batch: { type: 'string', default: '4' } } });
const steps = Number(values.steps), seqLen = Number(values['seq-len']), batch = Number(values.batch);
const dir = mkdtempSync(join(tmpdir(), 'qalora-bench-mpi-'));
const data = join(dir, 'data.txt');
writeFileSync(data, readFileSync(demoAssets.data, 'utf8').slice(0, 400_000));

function run(label: string, threads: number, ranks: number): { label: string; tps: number } {
  const out = join(dir, label.replace(/\W+/g, '-'));
  const args = [
    join(repoRoot, 'bin/qalora.mjs'), 'train', '--model', demoAssets.model, '--tokenizer', demoAssets.tokenizer,
    '--spec', join(repoRoot, 'specs/stories260k.qal'), '--data', data, '--out', out, '--max-steps', String(steps),
    '--seq-len', String(seqLen), '--batch-size', String(batch / ranks), '--eval-every', '0', '--save-every', '0', '--quiet',
    ...(ranks > 1 ? ['--nproc', String(ranks)] : []),
  ];
  const r = spawnSync(process.execPath, args, { cwd: repoRoot, encoding: 'utf8', env: { ...process.env, QALORA_THREADS: String(threads) } });
  if (r.status !== 0) throw new Error(`${label} failed:\n${r.stderr}`);
  const tps = Number(/\((\d+) tokens\/s\)/.exec(r.stdout)?.[1]);
  return { label, tps };
}

// Warm the build and the token cache so the first configuration pays for neither.
run('warm-up', 2, 1);
const rows = [run('1 process, 1 thread', 1, 1), run('1 process, 2 threads', 2, 1)];
if (findMpirun()) rows.push(run('2 MPI ranks, 1 thread each', 1, 2));
else rows.push({ label: '2 MPI ranks, 1 thread each (no mpirun: skipped)', tps: NaN });
rmSync(dir, { recursive: true, force: true });

process.stdout.write(`stories260K INT4 training, ${steps} steps × ${batch} windows of ${seqLen} tokens; ${availableParallelism()} CPUs (${cpus()[0]?.model ?? '?'})\n\n`);
process.stdout.write('| configuration | tokens/s | vs 1 thread |\n|---|---|---|\n');
for (const r of rows) process.stdout.write(`| ${r.label} | ${Number.isNaN(r.tps) ? '—' : r.tps} | ${Number.isNaN(r.tps) ? '—' : (r.tps / rows[0].tps).toFixed(2) + '×'} |\n`);
