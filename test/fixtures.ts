// Resolves the shared fixtures (../shared beside the repository, or $QALORA_FIXTURES) for tests.
// Under CI=true a missing fixture fails the test that needs it; elsewhere such a test is skipped with a reason.
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');
export const fixturesRoot = process.env.QALORA_FIXTURES ?? resolve(repoRoot, '..', 'shared');

/** Absolute path of a fixture, e.g. fixture('models/stories260K/stories260K.bin'). */
export function fixture(rel: string): string {
  return join(fixturesRoot, rel);
}

/** True when every fixture exists; throws under CI when one is missing (tests must fail, not skip, there). */
export function haveFixtures(...rels: string[]): boolean {
  const missing = rels.filter((r) => !existsSync(fixture(r)));
  if (missing.length === 0) return true;
  if (process.env.CI === 'true') throw new Error(`missing fixtures under ${fixturesRoot}: ${missing.join(', ')}`);
  return false;
}
