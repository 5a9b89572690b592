// What the peer benchmarks (bench/decode.ts, bench/train.ts) share for measuring on a shared 2-core machine, one
// thing at a time: a child process run to completion, and a load-average gate before each measurement. Other jobs
// on the cores slow every tool, and llama.cpp's spinning threads far more than the others (0.9 against 7.1 tok/s
// measured on a busy afternoon), so each number is reported with the load it was taken under.
import { spawn } from 'node:child_process';
import { loadavg } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
/** Above this 1-minute load average on 2 cores, something else is sharing them. */
export const BUSY = 1.2;

export interface ChildResult { code: number; stdout: string; stderr: string }

/** Runs argv in the repository root to completion (stdout and stderr collected). */
export function runChild(argv: string[], env: NodeJS.ProcessEnv = {}): Promise<ChildResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(argv[0], argv.slice(1), { cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '', stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    p.on('error', reject);
    p.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}

/** An error naming the child's exit status and the end of its stderr. */
export function childFailed(r: ChildResult, what: string): Error {
  return new Error(`${what} exited ${r.code}: ${r.stderr.trim().split('\n').slice(-10).join('\n')}`);
}

/** The child's last stdout line as JSON, or childFailed. */
export function lastJson<T>(r: ChildResult, what: string): T {
  const last = r.stdout.trim().split('\n').pop() ?? '';
  if (r.code === 0 && last.startsWith('{')) return JSON.parse(last) as T;
  throw childFailed(r, what);
}

/**
 * Waits up to `settleSeconds` for the 1-minute load average to fall below BUSY (our own previous measurement
 * keeps it up for a minute), then returns the 1/5/15-minute averages, warning on stderr when still busy.
 */
export async function quietMoment(what: string, settleSeconds: number): Promise<number[]> {
  const until = performance.now() + settleSeconds * 1000;
  while (loadavg()[0] > BUSY && performance.now() < until) await new Promise((r) => setTimeout(r, 2000));
  const l = loadavg();
  if (l[0] > BUSY) {
    process.stderr.write(`warning: load average ${l[0].toFixed(2)} > ${BUSY} before ${what}: other jobs share the 2 cores, so this measures the machine as much as the tool\n`);
  }
  return l;
}

/** "0.83" or "3.41 (busy)": the 1-minute average as the tables print it. */
export function loadLabel(l: number[]): string {
  return l[0].toFixed(2) + (l[0] > BUSY ? ' (busy)' : '');
}
