// Resolves the test fixtures. The demo's three files are embedded in the repository (assets/demo/) and read from
// there, so the tests that need only them run on any clone; the others live in ../shared beside the repository
// (or $QALORA_FIXTURES). A test that needs a missing one is skipped with the reason (test/skip-reporter.ts lists
// them); under CI=true, where every fixture must be present, it fails instead.
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { it } from 'vitest';
import { demoAssets, repoRoot } from '../runtime/assets.ts';

export { repoRoot };
export const fixturesRoot = process.env.QALORA_FIXTURES ?? resolve(repoRoot, '..', 'shared');

// Keyed by their path in the shared fixtures, of which they are byte-identical copies.
const embedded: Record<string, string> = {
  'models/stories260K/stories260K.bin': demoAssets.model,
  'models/stories260K/tok512.bin': demoAssets.tokenizer,
  'data/shakespeare/tinyshakespeare.txt': demoAssets.data,
};

declare module 'vitest' {
  interface TaskMeta {
    /** Why the test was skipped: the fixtures it needs that are missing (read by test/skip-reporter.ts). */
    needs?: string;
  }
}

/** Absolute path of a fixture, e.g. fixture('models/stories260K/stories260K.bin'). */
export function fixture(rel: string): string {
  return embedded[rel] ?? join(fixturesRoot, rel);
}

/**
 * Options for a test or suite that reads fixtures: `it(name, needs(A, B), fn)`, `describe(name, needs(A), fn)`.
 * With one missing it is skipped, the reason in its meta. Under CI a failing test naming the missing fixtures is
 * registered beside it instead (and it is skipped, so it does not also fail on a missing file).
 */
export function needs(...rels: string[]): { skip: boolean; meta: { needs?: string } } {
  // An embedded file is part of the repository: if it is gone the test must fail on it, never skip.
  const missing = rels.filter((r) => !(r in embedded) && !existsSync(fixture(r)));
  if (missing.length === 0) return { skip: false, meta: {} };
  const reason = `needs ${missing.join(', ')} (not in ${fixturesRoot}: put ../shared beside the checkout or set QALORA_FIXTURES)`;
  if (process.env.CI === 'true') {
    it(`fixtures present: ${missing.join(', ')}`, () => {
      throw new Error(`CI=true and a test ${reason}`);
    });
  }
  return { skip: true, meta: { needs: reason } };
}
