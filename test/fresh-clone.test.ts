// What a new user gets (issue 15): a copy of the repository with no ../shared beside it runs `qalora demo` on the
// embedded assets, and its tests skip, naming the reason, what needs the shared fixtures — except under CI=true,
// where a missing fixture fails.
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { copyFileSync, cpSync, existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadSpecOrFail } from '../compiler/spec-file.ts';
import { loadNativeOps } from '../runtime/model/native-ops.ts';
import { keyOf, kernelsDir } from '../runtime/native.ts';
import { repoRoot } from './fixtures.ts';

const root = mkdtempSync(join(tmpdir(), 'qalora-clone-')); // holds the copy and nothing else: no shared/
const clone = join(root, 'qalora');
afterAll(() => rmSync(root, { recursive: true, force: true }));

/** The tracked files plus the new ones not yet committed (not ignored): what the next commit's clone holds. */
function copyRepository(): void {
  const ls = spawnSync('git', ['ls-files', '-z', '--cached', '--others', '--exclude-standard'], { cwd: repoRoot, encoding: 'utf8' });
  if (ls.status !== 0) throw new Error(`git ls-files failed: ${ls.stderr}`);
  for (const f of ls.stdout.split('\0').filter((p) => p && existsSync(join(repoRoot, p)))) {
    mkdirSync(dirname(join(clone, f)), { recursive: true });
    copyFileSync(join(repoRoot, f), join(clone, f));
  }
  // `npm ci`'s result, linked rather than downloaded again.
  symlinkSync(join(repoRoot, 'node_modules'), join(clone, 'node_modules'), 'dir');
}

// The demo's two addons, built here (the rest of the suite uses them too) and copied: they are a cache keyed by the
// hash of their sources, so the copy reuses them instead of spending minutes of g++ on what this test is not about.
async function seedBuildCache(): Promise<void> {
  const spec = loadSpecOrFail(join(repoRoot, 'specs/stories260k.qal'));
  await loadNativeOps(spec, 'cpu');
  await loadNativeOps(undefined, 'cpu');
  const cpuOnly = { cpu: true, cuda: null };
  for (const from of [kernelsDir(spec.layers.map(keyOf), cpuOnly), kernelsDir([], cpuOnly)]) {
    cpSync(from, join(clone, relative(repoRoot, from)), { recursive: true, filter: (p) => keepOfBuild(relative(from, p)) });
  }
}

// Of build/, only the addon and its stamp (compiler/build.ts's cache entry): CMake's own cache names this checkout's
// folders, and should the sources differ after all, the copy must configure afresh rather than build in ours. No
// .build-lock either: one held here by a concurrent build would make the copy wait for a process it cannot see end.
const keepOfBuild = (rel: string) =>
  rel !== '.build-lock' && ((rel !== 'build' && !rel.startsWith('build/')) || ['build', 'build/Release', 'build/qalora-build.json'].includes(rel) || /^build\/Release\/[^/]+\.node$/.test(rel));

/** Runs node in the copy as a user would: no QALORA_FIXTURES, CI only where asked, and none of this runner's state. */
function run(args: string[], ci = false): SpawnSyncReturns<string> & { out: string } {
  const env: NodeJS.ProcessEnv = { NO_COLOR: '1' };
  for (const [k, v] of Object.entries(process.env)) if (!/^(QALORA_FIXTURES|CI|VITEST.*|FORCE_COLOR)$/.test(k)) env[k] = v;
  if (ci) env.CI = 'true';
  const r = spawnSync(process.execPath, args, { cwd: clone, env, encoding: 'utf8' });
  return { ...r, out: r.stdout + r.stderr };
}

describe('a copy of the repository without ../shared', () => {
  beforeAll(async () => {
    copyRepository();
    await seedBuildCache();
  });

  it('runs `qalora demo` on the embedded files: perplexity before and after, and a sample', () => {
    const r = run(['bin/qalora.mjs', 'demo', '--steps', '4', '--data-chars', '20000', '--batch-size', '2', '--seq-len', '32',
      '--eval-windows', '4', '--sample-tokens', '16', '--quiet']);
    expect(r.status, r.out).toBe(0);
    expect(r.stdout).toContain(join(clone, 'assets', 'demo', 'stories260K.bin'));
    expect(r.stdout).toMatch(/held-out perplexity: float \d+\.\d+, INT4 base \d+\.\d+/);
    expect(r.stdout).toMatch(/held-out perplexity: INT4 base \d+\.\d+ → merged INT4 \d+\.\d+/);
    expect(r.stdout).toMatch(/│ ROMEO:/);
    expect(r.out).not.toMatch(/\bshared\//); // no path into a fixtures folder
  });

  it('skips a test whose fixture is missing, naming it; under CI=true that fails instead', () => {
    // A probe rather than a real test file: it tests the helper, config and reporter, nothing else.
    writeFileSync(join(clone, 'test', 'needs-probe.test.ts'), [
      "import { it } from 'vitest';",
      "import { needs } from './fixtures.ts';",
      "it('reads a shared fixture', needs('models/aidreams260K/aidreams260K.bin'), () => {});",
      "it('reads an embedded one', needs('models/stories260K/stories260K.bin'), () => {});",
    ].join('\n'));
    const probe = ['node_modules/vitest/vitest.mjs', 'run', 'test/needs-probe.test.ts'];
    const local = run(probe);
    expect(local.status, local.out).toBe(0);
    expect(local.out).toMatch(/Tests +1 passed \| 1 skipped/);
    expect(local.out).toMatch(/↓ test\/needs-probe\.test\.ts > reads a shared fixture — needs models\/aidreams260K\/aidreams260K\.bin/);
    const ci = run(probe, true);
    expect(ci.status, ci.out).not.toBe(0);
    expect(ci.out).toMatch(/FAIL +test\/needs-probe\.test\.ts > fixtures present: models\/aidreams260K\/aidreams260K\.bin/);
    expect(ci.out).toMatch(/Tests +1 failed \| 1 passed \| 1 skipped/);
  });
});
