// The DSL end to end: the shipped example specs resolve to the layer shapes their models really have,
// defaults and inheritance behave as specs/README.md documents, and the API's promises hold
// (spec undefined iff an error, includes relative to the includer, diagnostics point into the source).
import { openSync, readFileSync, readSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { formatDiagnostics, loadSpec, parseSpec } from '../dsl/index.ts';
import { divisors } from '../dsl/defaults.ts';
import { editDistance, suggest } from '../dsl/suggest.ts';
import type { ResolvedSpec } from '../dsl/resolved.ts';
import { fixture, repoRoot } from './fixtures.ts';

const specPath = (name: string) => join(repoRoot, 'specs', name);

/** Expected projections from a model card's numbers, written out independently of dsl/defaults.ts. */
function expectedShapes(m: { dim: number; hidden: number; heads: number; kvHeads: number }) {
  const kv = (m.dim / m.heads) * m.kvHeads;
  return {
    q: [m.dim, m.dim], k: [m.dim, kv], v: [m.dim, kv], o: [m.dim, m.dim],
    gate: [m.dim, m.hidden], up: [m.dim, m.hidden], down: [m.hidden, m.dim],
  } as Record<string, [number, number]>;
}

function load(name: string): ResolvedSpec {
  const r = loadSpec(specPath(name));
  const errors = r.diagnostics.filter((d) => d.severity === 'error');
  expect(errors, formatDiagnostics(errors, r.sources)).toEqual([]);
  expect(r.spec).toBeDefined();
  return r.spec!;
}

function shapesOf(spec: ResolvedSpec) {
  return Object.fromEntries(spec.layers.map((l) => [l.name, [l.inFeatures, l.outFeatures]]));
}

describe('example specs', () => {
  it('llama2-7b: the paper setting on LLaMA-2 7B', () => {
    const spec = load('llama2-7b.qal');
    expect(spec.model).toEqual({ dim: 4096, hidden: 11008, layers: 32, heads: 32, kvHeads: 32, vocab: 32000, context: 4096, ropeTheta: 10000, normEps: 1e-5 });
    expect(shapesOf(spec)).toEqual(expectedShapes({ dim: 4096, hidden: 11008, heads: 32, kvHeads: 32 }));
    for (const l of spec.layers) {
      expect([l.bits, l.group, l.rank, l.alpha, l.pool, l.count]).toEqual([4, 32, 64, 16, 'mean', 32]);
      expect(l.projection).toBe(l.name);
    }
    expect(spec.targets).toEqual({ cpu: true, cuda: { archs: ['sm_80', 'sm_90'] } });
  });

  it('tinyllama-1.1b: grouped-query attention gives k, v 2048 → 256', () => {
    const spec = load('tinyllama-1.1b.qal');
    expect(spec.model).toMatchObject({ dim: 2048, hidden: 5632, layers: 22, heads: 32, kvHeads: 4, vocab: 32000, context: 2048, ropeTheta: 10000 });
    expect(shapesOf(spec)).toEqual(expectedShapes({ dim: 2048, hidden: 5632, heads: 32, kvHeads: 4 }));
    expect(spec.layers.find((l) => l.name === 'k')!.outFeatures).toBe(256);
    expect(spec.layers.every((l) => l.count === 22 && l.inFeatures % l.group === 0)).toBe(true);
  });

  it('stories260k: all projections adapted at full capacity (rank = in/group), down on group 43, cpu + cuda', () => {
    const r = loadSpec(specPath('stories260k.qal'));
    expect(r.diagnostics).toEqual([]);
    const spec = r.spec!;
    expect(spec.name).toBe('stories260k');
    expect(shapesOf(spec)).toEqual(expectedShapes({ dim: 64, hidden: 172, heads: 8, kvHeads: 4 }));
    for (const l of spec.layers) {
      expect([l.bits, l.dropout, l.pool, l.dtype, l.count]).toEqual([4, 0.05, 'mean', 'fp32', 5]);
      expect(l.group).toBe(l.name === 'down' ? 43 : 32);
      expect(l.rank).toBe(l.inFeatures / l.group);
      expect(l.alpha / l.rank).toBe(2);
      expect(l.inFeatures % l.group).toBe(0);
    }
    expect(spec.targets).toEqual({ cpu: true, cuda: { archs: ['sm_80', 'sm_90'] } });
  });

  it('stories260k matches the real model file header', () => {
    // llama2.c v0 header: 7 × i32 {dim, hidden, layers, heads, kv_heads, vocab (negative: unshared), seq_len}.
    const fd = openSync(fixture('models/stories260K/stories260K.bin'), 'r');
    const header = Buffer.alloc(28);
    readSync(fd, header, 0, 28, 0);
    closeSync(fd);
    const [dim, hidden, layers, heads, kvHeads, vocab, context] = Array.from({ length: 7 }, (_, i) => header.readInt32LE(i * 4));
    const spec = loadSpec(specPath('stories260k.qal')).spec!;
    expect(spec.model).toMatchObject({ dim, hidden, layers, heads, kvHeads, vocab: Math.abs(vocab), context });
  });

  it('every spec in specs/ loads without errors', () => {
    for (const name of ['llama2-7b.qal', 'tinyllama-1.1b.qal', 'stories260k.qal']) load(name);
  });
});

describe('defaults and inheritance', () => {
  const minimal = 'model m { llama { dim 64 hidden 128 layers 2 heads 4 vocab 100 context 16 } qalora { rank 2 } }';

  it('fills documented defaults (specs/README.md) for what a spec leaves out', () => {
    const spec = parseSpec(minimal, 'm.qal').spec!;
    const readme = readFileSync(join(repoRoot, 'specs', 'README.md'), 'utf8');
    // The README's key table states each default as "| `key` | … | default |"; read it back, compare.
    const documented = (key: string) => new RegExp('^\\| `' + key + '` \\|[^\\n]*\\| `?([^`|]+?)`? \\|$', 'm').exec(readme)?.[1];
    const l = spec.layers[0];
    expect(l.bits).toBe(Number(documented('bits')));
    expect(l.group).toBe(Number(documented('group')));
    expect(l.alpha).toBe(Number(documented('alpha')));
    expect(l.dropout).toBe(Number(documented('dropout')));
    expect(l.pool).toBe(documented('pool'));
    expect(l.dtype).toBe(documented('dtype'));
    expect(documented('rank')).toBe('64');
    expect(spec.model!.kvHeads).toBe(4); // kv_heads defaults to heads
    expect(spec.model!.ropeTheta).toBe(Number(documented('rope_theta')));
    expect(spec.model!.normEps).toBe(Number(documented('norm_eps')));
    expect(spec.targets).toEqual({ cpu: true, cuda: { archs: ['sm_80', 'sm_90'] } });
    expect(spec.layers.map((x) => x.rank)).toEqual([2, 2, 2, 2, 2, 2, 2]); // adapters default: all_linear
  });

  it('projections outside `adapters` keep their quantization but get rank 0', () => {
    const spec = parseSpec(minimal.replace('qalora', 'adapters q, v  qalora'), 'm.qal').spec!;
    expect(Object.fromEntries(spec.layers.map((l) => [l.name, l.rank]))).toEqual({ q: 2, k: 0, v: 2, o: 0, gate: 0, up: 0, down: 0 });
    expect(spec.layers.every((l) => l.bits === 4 && l.group === 32)).toBe(true);
  });

  it('override wins over qalora, qalora over defaults, defaults over built-ins', () => {
    const text = `
      defaults { qalora { bits 2  alpha 8  pool sum } target cpu }
      model m {
        llama { dim 64 hidden 128 layers 2 heads 4 vocab 100 context 16 }
        qalora { bits 3  rank 2 }
        override down, up { bits 8  dtype bf16 }
      }`;
    const spec = parseSpec(text, 'm.qal').spec!;
    const by = Object.fromEntries(spec.layers.map((l) => [l.name, l]));
    expect([by.q.bits, by.q.alpha, by.q.pool, by.q.dtype, by.q.group]).toEqual([3, 8, 'sum', 'fp32', 32]);
    expect([by.down.bits, by.down.dtype, by.up.bits, by.gate.bits]).toEqual([8, 'bf16', 8, 3]);
    expect(spec.targets).toEqual({ cpu: true, cuda: null });
  });

  it('targets: cuda alone, default archs, explicit archs', () => {
    const base = 'spec s { layer a { in 64 out 8 rank 2 } ';
    expect(parseSpec(base + 'target cuda }', 's.qal').spec!.targets).toEqual({ cpu: false, cuda: { archs: ['sm_80', 'sm_90'] } });
    expect(parseSpec(base + 'target cuda { archs sm_90a, sm_120 } }', 's.qal').spec!.targets).toEqual({ cpu: false, cuda: { archs: ['sm_90a', 'sm_120'] } });
  });

  it('standalone layers: in/out as written, count 1, no projection, own settings', () => {
    const spec = parseSpec('spec probe { qalora { rank 4 } layer a { in 256 out 10 } layer b { in 172 out 3 group 43 bits 3 rank 0 } }', 'p.qal').spec!;
    expect(spec.model).toBeUndefined();
    expect(spec.layers).toEqual([
      { name: 'a', inFeatures: 256, outFeatures: 10, count: 1, bits: 4, group: 32, rank: 4, alpha: 16, dropout: 0.05, pool: 'mean', dtype: 'fp32', scales: 'fp32' },
      { name: 'b', inFeatures: 172, outFeatures: 3, count: 1, bits: 3, group: 43, rank: 0, alpha: 16, dropout: 0.05, pool: 'mean', dtype: 'fp32', scales: 'fp32' },
    ]);
  });

  it('an unnamed model takes its name from the file', () => {
    expect(parseSpec('model { llama { dim 64 hidden 128 layers 1 heads 4 vocab 10 context 8 } qalora { rank 1 } }', 'dir/my-model.qal').spec!.name).toBe('my_model');
  });

  it('reads files with a byte-order mark, CRLF line ends and no-break spaces', () => {
    const text = '\uFEFFspec s {\r\n  layer a {\u00A0in 64 out 8 rank 2 }\r\n  layer b { in 64 out 8 bits 5 rank 2 }\r\n}\r\n';
    const r = parseSpec(text, 's.qal');
    expect(r.diagnostics.map((d) => [d.line, d.col, d.message])).toEqual([[3, 30, 'bits 5 is not supported']]);
  });

  it('the resolved spec is plain JSON data', () => {
    const spec = loadSpec(specPath('llama2-7b.qal')).spec!;
    expect(JSON.parse(JSON.stringify(spec))).toEqual(spec);
  });
});

describe('includes', () => {
  const files: Record<string, string> = {
    'main.qal': 'include "lib/a.qal"\ninclude "lib/b.qal"\nmodel m { llama { dim 64 hidden 128 layers 1 heads 4 vocab 10 context 8 } }\n',
    'lib/a.qal': 'include "common.qal"\ndefaults { qalora { bits 8 } }\n',
    'lib/b.qal': 'include "common.qal"\n',
    'lib/common.qal': 'defaults { qalora { rank 1  group 16 } }\n',
  };
  const read = (p: string) => {
    if (!(p in files)) throw Object.assign(new Error('ENOENT'), { code: 'ENOENT' });
    return files[p];
  };

  it('resolves paths relative to the including file and reads a shared file once', () => {
    const r = loadSpec('main.qal', read);
    expect(r.diagnostics).toEqual([]);
    expect([...r.sources.keys()]).toEqual(['main.qal', 'lib/a.qal', 'lib/common.qal', 'lib/b.qal']);
    expect(r.spec!.layers.every((l) => l.bits === 8 && l.rank === 1 && l.group === 16)).toBe(true);
  });

  it('reports a missing root file as a diagnostic', () => {
    const r = loadSpec(join(repoRoot, 'specs', 'does-not-exist.qal'));
    expect(r.spec).toBeUndefined();
    expect(r.diagnostics[0].message).toMatch(/cannot read/);
    expect(formatDiagnostics(r.diagnostics, r.sources)).toContain('does-not-exist.qal:1:1: error');
  });

  it('parseSpec reads includes from disk relative to its file name', () => {
    const r = parseSpec('include "stories260k.qal"\n', specPath('x.qal'));
    expect(r.spec?.name).toBe('stories260k');
  });
});

describe('diagnostics', () => {
  it('reports several problems in one run, each at its token', () => {
    const text = 'model m {\n  llama { dim 64 hidden 128 layers 2 heads 8 vocab 10 context 8 }\n  qalora { bits 5  grup 32  rank 2 }\n  target cuda { archs sm_61 }\n}\n';
    const r = parseSpec(text, 'm.qal');
    expect(r.spec).toBeUndefined();
    const lines = text.split('\n');
    const at = r.diagnostics.filter((d) => d.severity === 'error').map((d) => lines[d.line - 1].slice(d.col - 1, d.endCol! - 1));
    expect(at).toEqual(['5', 'grup', 'sm_61']);
  });

  it('warnings alone keep the spec', () => {
    const r = parseSpec('spec s { layer a { in 64 out 8 rank 9 } }', 's.qal');
    expect(r.diagnostics.map((d) => d.severity)).toEqual(['warning']);
    expect(r.spec).toBeDefined();
  });

  it('formats file:line:col, the line, a caret with tildes, and the hint', () => {
    const r = parseSpec('model m {\n  qalora { grup 4 }\n}\n', 'x.qal');
    const text = formatDiagnostics(r.diagnostics.filter((d) => d.message.includes('grup')), r.sources);
    expect(text).toBe("x.qal:2:12: error: unknown key `grup` in `qalora`\n 2 |   qalora { grup 4 }\n   |            ^~~~\n  hint: did you mean `group`?\n");
  });

  it('group error lists exactly the divisors of in', () => {
    const r = parseSpec('spec s { layer a { in 172 out 8 group 32 rank 1 } }', 's.qal');
    expect(r.diagnostics[0].hint).toContain('1, 2, 4, 43, 86, 172');
  });
});

describe('helpers', () => {
  it('divisors match a brute-force count', () => {
    for (const n of [1, 2, 12, 36, 97, 172, 4096, 11008, 5632]) {
      expect(divisors(n)).toEqual(Array.from({ length: n }, (_, i) => i + 1).filter((d) => n % d === 0));
    }
  });

  it('edit distance counts insertions, deletions, substitutions and adjacent swaps', () => {
    expect(editDistance('kitten', 'sitting')).toBe(3);
    expect(editDistance('rnak', 'rank')).toBe(1);
    expect(editDistance('', 'abc')).toBe(3);
    expect(editDistance('group', 'group')).toBe(0);
    expect(suggest('droput', ['dropout', 'group'])).toBe('dropout');
    expect(suggest('zzzzzz', ['dropout', 'group'])).toBeUndefined();
    expect(suggest('intermediate_size', ['dim', 'hidden'])).toBe('hidden');
    expect(suggest('constructor', ['dim'])).toBeUndefined();
  });
});
