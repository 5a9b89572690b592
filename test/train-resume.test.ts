// `qalora train` on the real model, killed with SIGINT mid-run and resumed with --resume, reproduces the losses
// and final adapter of an uninterrupted run exactly; the checkpoint is written on Ctrl-C.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fixture, repoRoot } from './fixtures.ts';
import { shakespeareSlice, STORIES, TOK } from './train-fixture.ts';

const dir = mkdtempSync(join(tmpdir(), 'qalora-resume-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

// Lines only: the poll below may read while the trainer is appending one.
const trainLosses = (out: string) =>
  readFileSync(join(out, 'metrics.jsonl'), 'utf8').split('\n').filter((l) => l.endsWith('}')).map((l) => JSON.parse(l)).filter((r) => r.kind === 'train');

describe('train: Ctrl-C and --resume (stories260K)', () => {
  it('a SIGINT-stopped, resumed run equals the uninterrupted one', async () => {
    const data = shakespeareSlice(dir, 20_000);
    const args = (out: string) => [
      join(repoRoot, 'bin/qalora.mjs'), 'train', '--model', fixture(STORIES), '--tokenizer', fixture(TOK),
      '--spec', join(repoRoot, 'specs/stories260k.qal'), '--data', data, '--out', out, '--max-steps', '60', '--seq-len', '32',
      '--batch-size', '2', '--grad-accum', '2', '--eval-every', '0', '--save-every', '1000', '--seed', '3', '--schedule', 'cosine', '--quiet',
    ];
    const full = join(dir, 'full');
    const a = spawnSync(process.execPath, args(full), { cwd: repoRoot, encoding: 'utf8' });
    expect(a.status, a.stderr).toBe(0);
    expect(trainLosses(full).length).toBe(60);

    const cut = join(dir, 'cut');
    const child = spawn(process.execPath, args(cut), { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    const exited = new Promise<number | null>((res) => child.on('exit', (code) => res(code)));
    // Interrupt once a few steps are logged.
    for (let i = 0; i < 600; i++) {
      await new Promise((r) => setTimeout(r, 100));
      if (existsSync(join(cut, 'metrics.jsonl')) && trainLosses(cut).length >= 3) break;
    }
    child.kill('SIGINT');
    expect(await exited, stderr).toBe(0);
    const stoppedAt = trainLosses(cut).length;
    expect(stoppedAt).toBeGreaterThanOrEqual(3);
    expect(stoppedAt).toBeLessThan(60);
    expect(existsSync(join(cut, 'checkpoint', 'trainer_state.json'))).toBe(true);
    expect(JSON.parse(readFileSync(join(cut, 'checkpoint', 'trainer_state.json'), 'utf8')).step).toBe(stoppedAt);

    const b = spawnSync(process.execPath, [join(repoRoot, 'bin/qalora.mjs'), 'train', '--resume', '--out', cut, '--quiet'], { cwd: repoRoot, encoding: 'utf8' });
    expect(b.status, b.stderr).toBe(0);
    const pick = (rs: { step: number; loss: number; lr: number; gradNorm: number }[]) => rs.map(({ step, loss, lr, gradNorm }) => ({ step, loss, lr, gradNorm }));
    expect(pick(trainLosses(cut))).toEqual(pick(trainLosses(full)));
    const w = (out: string) => readFileSync(join(out, 'adapter', 'adapter_model.safetensors'));
    expect(w(cut).equals(w(full))).toBe(true);
  });

  it('merge, eval and export CLIs run on the trained adapter and agree with each other', () => {
    const cut = join(dir, 'cut');
    const cli = (...a: string[]) => {
      const r = spawnSync(process.execPath, [join(repoRoot, 'bin/qalora.mjs'), ...a], { cwd: repoRoot, encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
      return r.stdout;
    };
    const data = join(dir, 'shakespeare-slice.txt');
    const spec = join(repoRoot, 'specs/stories260k.qal');
    const mergedPath = join(dir, 'merged.safetensors');
    expect(cli('merge', '--model', fixture(STORIES), '--spec', spec, '--adapter', join(cut, 'adapter'), '--out', mergedPath)).toMatch(/merged 35 QA-LoRA layers/);
    const ce = (s: string) => Number(/cross-entropy ([\d.]+)/.exec(s)![1]);
    const common = ['--data', data, '--split', 'val', '--seq-len', '32', '--quiet'];
    const withAdapter = ce(cli('eval', '--model', fixture(STORIES), '--spec', spec, '--adapter', join(cut, 'adapter'), ...common));
    const merged = ce(cli('eval', '--model', mergedPath, ...common)); // spec and tokenizer come from the file
    const base = ce(cli('eval', '--model', fixture(STORIES), '--spec', spec, ...common));
    expect(Math.abs(merged - withAdapter)).toBeLessThan(2e-4);
    expect(merged).toBeLessThan(base);
    expect(cli('export', '--model', mergedPath, '--format', 'gguf', '--out', join(dir, 'm.gguf'))).toMatch(/30 Q4_1/);
  });
});
