// `qalora check`: registered on a fresh commander program and run in-process, so the test does not depend
// on every other subcommand loading.
import { join } from 'node:path';
import { Command } from 'commander';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { register } from '../runtime/cli/check.ts';
import { repoRoot } from './fixtures.ts';

async function check(...args: string[]): Promise<{ stdout: string; stderr: string; error?: Error }> {
  let stdout = '';
  let stderr = '';
  vi.spyOn(process.stdout, 'write').mockImplementation((s) => ((stdout += String(s)), true));
  vi.spyOn(process.stderr, 'write').mockImplementation((s) => ((stderr += String(s)), true));
  const program = new Command('qalora').exitOverride();
  register(program);
  try {
    await program.parseAsync(['node', 'qalora', 'check', ...args]);
    return { stdout, stderr };
  } catch (error) {
    return { stdout, stderr, error: error as Error };
  } finally {
    vi.restoreAllMocks();
  }
}

afterEach(() => vi.restoreAllMocks());

describe('qalora check', () => {
  it('prints one row per resolved layer with its shape and settings', async () => {
    const r = await check(join(repoRoot, 'specs', 'tinyllama-1.1b.qal'));
    expect(r.error).toBeUndefined();
    const rows = r.stdout.split('\n').filter((l) => /^(q|k|v|o|gate|up|down)\s/.test(l)).map((l) => l.split(/\s+/));
    expect(rows.map((c) => [c[0], Number(c[1]), Number(c[2]), Number(c[3])])).toEqual([
      ['q', 2048, 2048, 22], ['k', 2048, 256, 22], ['v', 2048, 256, 22], ['o', 2048, 2048, 22],
      ['gate', 2048, 5632, 22], ['up', 2048, 5632, 22], ['down', 5632, 2048, 22],
    ]);
    expect(r.stdout).toContain('targets: cpu, cuda (sm_80, sm_90)');
  });

  it('--json prints the resolved spec', async () => {
    const r = await check(join(repoRoot, 'specs', 'stories260k.qal'), '--json');
    const spec = JSON.parse(r.stdout);
    expect(spec.layers.find((l: { name: string }) => l.name === 'down').group).toBe(43);
    expect(r.stderr).toBe('');
  });

  it('fails with the diagnostics on a broken spec', async () => {
    const r = await check(join(repoRoot, 'test', 'golden', 'dsl', 'group_divisor.qal'));
    expect(r.error?.message).toMatch(/has errors/);
    expect(r.stderr).toContain("group_divisor.qal:4:26: error: group 32 does not divide `down`'s in_features");
    expect(r.stdout).toBe('');
  });
});
