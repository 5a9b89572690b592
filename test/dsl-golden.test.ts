// Golden diagnostics: every test/golden/dsl/<case>.qal is loaded (includes read from that folder) and its
// formatted diagnostics must equal <case>.expected byte for byte. QALORA_UPDATE_GOLDEN=1 rewrites the
// .expected files instead — review the diff before committing it.
import { readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { formatDiagnostics, loadSpec, summarize } from '../dsl/index.ts';
import { repoRoot } from './fixtures.ts';

const dir = join(repoRoot, 'test', 'golden', 'dsl');
const cases = readdirSync(dir).filter((f) => f.endsWith('.qal')).sort();
const update = process.env.QALORA_UPDATE_GOLDEN === '1';

/** What the golden file holds: the diagnostics as a user sees them, then the count. */
function render(name: string): string {
  const result = loadSpec(name, (p) => readFileSync(join(dir, p), 'utf8'));
  const resolved = result.spec ? `resolved: ${result.spec.layers.map((l) => `${l.name} ${l.inFeatures}→${l.outFeatures} b${l.bits} g${l.group} r${l.rank}${l.scales === 'fp16' ? ' s16' : ''}`).join(', ')}\n` : '';
  return formatDiagnostics(result.diagnostics, result.sources) + summarize(result.diagnostics) + '\n' + resolved;
}

describe('DSL golden diagnostics', () => {
  it('has cases', () => expect(cases.length).toBeGreaterThan(20));
  for (const c of cases) {
    it(c, () => {
      const actual = render(c);
      const expectedPath = join(dir, c.replace(/\.qal$/, '.expected'));
      if (update) writeFileSync(expectedPath, actual);
      expect(actual).toBe(readFileSync(expectedPath, 'utf8'));
    });
  }
});
