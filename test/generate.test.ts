// `qalora generate` against llama2.c's own output (../shared/golden): greedy from BOS, with a prompt, from the
// GGUF v1 copy of the model, and for a second model (aidreams260K), all through the real CLI.
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { fixture, needs, repoRoot } from './fixtures.ts';

function qalora(args: string[]): { stdout: string } {
  const stdout = execFileSync(process.execPath, [join(repoRoot, 'bin/qalora.mjs'), ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  return { stdout };
}

const S = 'models/stories260K/';
const cases: Array<{ name: string; model: string; args: string[]; golden: string; extra?: string[] }> = [
  { name: 'stories260K .bin, greedy -n 200', model: `${S}stories260K.bin`, args: ['-z', fixture(`${S}tok512.bin`), '-n', '200'], golden: 'golden/stories260K_greedy_n200.txt' },
  { name: 'stories260K .bin, "Once upon a time" -n 64', model: `${S}stories260K.bin`, args: ['-z', fixture(`${S}tok512.bin`), '-n', '64', '--prompt', 'Once upon a time'], golden: 'golden/stories260K_prompt_once_n64.txt' },
  { name: 'stories260K GGUF v1, greedy -n 200', model: `${S}stories260K-f32.gguf-v1.gguf`, args: ['-n', '200'], golden: 'golden/stories260K_greedy_n200.txt' },
  { name: 'stories260K GGUF v1, "Once upon a time" -n 64', model: `${S}stories260K-f32.gguf-v1.gguf`, args: ['-n', '64', '--prompt', 'Once upon a time'], golden: 'golden/stories260K_prompt_once_n64.txt' },
  { name: 'aidreams260K .bin, greedy -n 128', model: 'models/aidreams260K/aidreams260K.bin', args: ['-n', '128'], golden: 'golden/aidreams260K_greedy_n128.txt' },
];

describe('qalora generate matches llama2.c', () => {
  for (const c of cases) {
    it(c.name, needs(c.model, c.golden), () => {
      const { stdout } = qalora(['generate', '--model', fixture(c.model), '--temperature', '0', ...c.args]);
      expect(stdout).toBe(readFileSync(fixture(c.golden), 'utf8'));
    });
  }

  it('--max-tokens counts new tokens; -n counts positions including BOS and the prompt', needs(`${S}stories260K.bin`, 'golden/stories260K_prompt_once_n64.txt'), () => {
    const base = ['generate', '--model', fixture(`${S}stories260K.bin`), '-t', '0', '--prompt', 'Once upon a time'];
    // The prompt is 5 tokens with BOS, so -n 64 makes 60 new tokens: the same text as --max-tokens 60.
    expect(qalora([...base, '--max-tokens', '60']).stdout).toBe(readFileSync(fixture('golden/stories260K_prompt_once_n64.txt'), 'utf8'));
    expect(qalora([...base, '--max-tokens', '0']).stdout).toBe('Once upon a time\n');
  });

  it('--profile prints where a decoded token\'s time goes, per op, and the text is unchanged', needs(`${S}stories260K.bin`, 'golden/stories260K_prompt_once_n64.txt'), () => {
    const args = ['generate', '--model', fixture(`${S}stories260K.bin`), '-t', '0', '--prompt', 'Once upon a time', '--max-tokens', '60', '--profile'];
    const r = spawnSync(process.execPath, [join(repoRoot, 'bin/qalora.mjs'), ...args], { encoding: 'utf8' });
    expect(r.status).toBe(0);
    expect(r.stdout).toBe(readFileSync(fixture('golden/stories260K_prompt_once_n64.txt'), 'utf8'));
    // 59 decode steps (the 60th token needs no forward), each op's row, and the rows adding up to the token
    expect(r.stderr).toMatch(/profile: 59 tokens, [0-9.]+ ms per token/);
    const rows = Object.fromEntries([...r.stderr.matchAll(/^(.+?)\s+([0-9.]+)\s+([0-9.]+)%$/gm)].map((m) => [m[1], Number(m[3])]));
    for (const op of ['q forward', 'down forward', 'attention forward', 'RMSNorm', 'classifier forward', 'JS glue', 'token']) expect(rows[op], op).toBeGreaterThan(0);
    const shares = Object.entries(rows).filter(([k]) => k !== 'token').reduce((a, [, v]) => a + v, 0);
    expect(shares).toBeGreaterThan(99);
    expect(shares).toBeLessThan(101);
  });

  it('bad flags give a clear error', () => {
    expect(() => qalora(['generate', '--model', fixture(`${S}stories260K.bin`), '-n', '5', '--max-tokens', '3'])).toThrow(/give -n or --max-tokens, not both/);
  });
});
