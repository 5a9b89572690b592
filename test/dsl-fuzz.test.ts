// Robustness: random mutations and truncations of real specs must never make parseSpec throw, and what it
// returns must stay coherent — a spec exactly when there is no error, every diagnostic inside its source,
// every resolved layer internally consistent. Seeded, so a failure reproduces.
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { formatDiagnostics, parseSpec } from '../dsl/index.ts';
import type { Diagnostic } from '../dsl/diagnostics.ts';
import { repoRoot } from './fixtures.ts';
import { uniformStream } from '../runtime/random.ts';

const seeds = [
  ...['stories260k.qal', 'llama2-7b.qal', 'tinyllama-1.1b.qal'].map((f) => readFileSync(join(repoRoot, 'specs', f), 'utf8')),
  ...readdirSync(join(repoRoot, 'test', 'golden', 'dsl')).filter((f) => f.endsWith('.qal')).map((f) => readFileSync(join(repoRoot, 'test', 'golden', 'dsl', f), 'utf8')),
];

const snippets = [
  '{', '}', ',', '"', '"x.qal"', '=', ':', ';', '\n', ' ', '#', '-', '.', '0', '-1', '1e400', '64.5', '99999999999', '9e15',
  'model', 'spec', 'layer', 'llama', 'qalora', 'override', 'target', 'cuda', 'cpu', 'archs', 'adapters', 'defaults',
  'include', 'bits', 'group', 'rank', 'dim', 'heads', 'kv_heads', 'all_linear', 'none', 'sm_90a', 'down', '__proto__',
  'constructor', 'toString', '\t', '\r\n', '\u00e9', '\ud83d\ude00', '\u0000', '\\', '{{{{', '}}}}', 'x-y', 'a.b',
];

function mutate(text: string, next: () => number): string {
  const pick = <T>(xs: readonly T[]) => xs[Math.floor(next() * xs.length)];
  const pos = () => Math.floor(next() * (text.length + 1));
  let t = text;
  const edits = 1 + Math.floor(next() * 4);
  for (let e = 0; e < edits; e++) {
    const p = Math.floor(next() * (t.length + 1));
    switch (Math.floor(next() * 7)) {
      case 0: t = t.slice(0, p); break; // truncate
      case 1: t = t.slice(0, p) + t.slice(p + 1 + Math.floor(next() * 20)); break; // delete a run
      case 2: t = t.slice(0, p) + pick(snippets) + t.slice(p); break; // insert a token
      case 3: { // duplicate a span elsewhere
        const a = pos();
        const span = text.slice(a, a + Math.floor(next() * 60));
        t = t.slice(0, p) + span + t.slice(p);
        break;
      }
      case 4: t = t.replace(/\d+(\.\d+)?/, () => pick(['0', '-3', '7', '1.5', '43', '1e9', 'x'])); break;
      case 5: { // swap two lines
        const lines = t.split('\n');
        const i = Math.floor(next() * lines.length);
        const j = Math.floor(next() * lines.length);
        [lines[i], lines[j]] = [lines[j], lines[i]];
        t = lines.join('\n');
        break;
      }
      default: t = t.slice(0, p) + String.fromCharCode(Math.floor(next() * 0x3000)) + t.slice(p); // random character
    }
  }
  return t;
}

/** Everything wrong with one result, as sentences (plain checks: thousands of expect() calls are slow). */
function incoherence(text: string, file: string, r: ReturnType<typeof parseSpec>): string[] {
  const bad: string[] = [];
  const errors = r.diagnostics.filter((d: Diagnostic) => d.severity === 'error');
  if ((r.spec === undefined) !== errors.length > 0) bad.push(`spec ${r.spec ? 'present' : 'absent'} with ${errors.length} errors`);
  const lines = text.split('\n');
  for (const d of r.diagnostics) {
    if (d.severity !== 'error' && d.severity !== 'warning') bad.push(`severity ${d.severity}`);
    if (!d.message) bad.push('empty message');
    if (d.file !== file) continue; // an include read from disk
    const line = lines[d.line - 1];
    if (line === undefined) bad.push(`${d.message}: line ${d.line} of ${lines.length}`);
    else if (!(d.col >= 1 && d.col <= line.length + 1)) bad.push(`${d.message}: col ${d.col} on a line of ${line.length}`);
    if (d.endCol !== undefined && !(d.endCol > d.col)) bad.push(`${d.message}: endCol ${d.endCol} <= col ${d.col}`);
  }
  if (typeof formatDiagnostics(r.diagnostics, r.sources) !== 'string') bad.push('format failed');
  for (const l of r.spec?.layers ?? []) {
    if (!(Number.isInteger(l.inFeatures) && l.inFeatures > 0 && l.outFeatures > 0)) bad.push(`${l.name}: shape ${l.inFeatures}x${l.outFeatures}`);
    if (l.inFeatures % l.group !== 0) bad.push(`${l.name}: group ${l.group} does not divide ${l.inFeatures}`);
    if (![2, 3, 4, 8].includes(l.bits)) bad.push(`${l.name}: bits ${l.bits}`);
    if (!(l.rank >= 0) || !(l.dropout >= 0 && l.dropout < 1)) bad.push(`${l.name}: rank ${l.rank} dropout ${l.dropout}`);
  }
  return bad;
}

function checkCoherent(text: string, file: string, parse: () => ReturnType<typeof parseSpec>): void {
  let problems: string[];
  try {
    problems = incoherence(text, file, parse());
  } catch (e) {
    problems = [`threw ${(e as Error).stack}`];
  }
  if (problems.length) expect({ input: text, problems }).toEqual({ input: text, problems: [] });
}

describe('DSL fuzzing', () => {
  it('never throws on mutated specs, and stays coherent', () => {
    const next = uniformStream(20230914);
    const file = join(repoRoot, 'test', 'golden', 'dsl', 'fuzz.qal'); // includes resolve next to the golden files
    for (let i = 0; i < 1500; i++) {
      const text = mutate(seeds[i % seeds.length], next);
      checkCoherent(text, file, () => parseSpec(text, file));
    }
  });

  it('never throws on every prefix of a spec', () => {
    const text = seeds[0];
    for (let n = 0; n <= text.length; n++) {
      const prefix = text.slice(0, n);
      checkCoherent(prefix, 'prefix.qal', () => parseSpec(prefix, 'prefix.qal'));
    }
  });

  it('never throws on random bytes and pathological shapes', () => {
    const next = uniformStream(7);
    const inputs = [
      '', '\n\n\n', '{'.repeat(10000), '}'.repeat(10000), 'a {'.repeat(3000), 'model m { '.repeat(50),
      'x '.repeat(5000), '"'.repeat(101), 'model m { llama { dim ' + '9'.repeat(400) + ' } }',
      ...Array.from({ length: 200 }, () => Array.from({ length: Math.floor(next() * 200) }, () => String.fromCharCode(Math.floor(next() * 128))).join('')),
    ];
    for (const text of inputs) checkCoherent(text, 'odd.qal', () => parseSpec(text, 'odd.qal'));
  });
});
