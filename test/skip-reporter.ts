// Names every skipped test and why, after the run: vitest's default reporter only counts them, and a test skipped
// for a missing fixture must be visible, not quietly green. The reason is a `ctx.skip(note)` note or the `needs`
// meta that test/fixtures.ts puts on a test or suite (a suite's meta is inherited by its tests).
import type { Reporter, TestModule } from 'vitest/node';

export default class SkipReporter implements Reporter {
  onTestRunEnd(modules: ReadonlyArray<TestModule>): void {
    const lines: string[] = [];
    for (const m of modules) {
      for (const t of m.children.allTests('skipped')) {
        const r = t.result();
        const why = t.meta().needs ?? (r.state === 'skipped' ? r.note : undefined) ?? 'no reason given';
        lines.push(`   ↓ ${m.relativeModuleId} > ${t.fullName} — ${why}`);
      }
    }
    if (lines.length) process.stdout.write(`\n Skipped (${lines.length}):\n${lines.join('\n')}\n`);
  }
}
