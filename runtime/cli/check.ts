// `qalora check SPEC`: reads a spec and says what it means — every diagnostic, then the resolved layers
// (shape, settings, sizes) and targets — without compiling anything. Exits non-zero on an error.
import type { Command } from 'commander';
import { formatTable } from '../../compiler/table.ts';
import { formatDiagnostics, loadSpec, summarize } from '../../dsl/index.ts';
import type { ResolvedSpec } from '../../dsl/resolved.ts';
import { QaloraError } from '../errors.ts';

/** Packed q (blocked32: `bits` u32 words per 32 inputs) plus f32 α and β per group, in bytes. */
function baseBytes(l: ResolvedSpec['layers'][number]): number {
  const groups = l.inFeatures / l.group;
  return l.outFeatures * (Math.ceil(l.inFeatures / 32) * l.bits * 4 + groups * 8);
}

/** A [rank, in/g] and B [out, rank]. */
function adapterParams(l: ResolvedSpec['layers'][number]): number {
  return l.rank * (l.inFeatures / l.group + l.outFeatures);
}

const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(bytes < 2 ** 20 ? 3 : 1)} MiB`;

export function describeSpec(spec: ResolvedSpec): string {
  const out: string[] = [];
  const m = spec.model;
  out.push(m
    ? `model ${spec.name}: dim ${m.dim}, hidden ${m.hidden}, ${m.layers} layers, ${m.heads} heads (${m.kvHeads} kv, head_dim ${m.dim / m.heads}), vocab ${m.vocab}, context ${m.context}, rope_theta ${m.ropeTheta}, norm_eps ${m.normEps}`
    : `spec ${spec.name}: ${spec.layers.length} standalone layer${spec.layers.length === 1 ? '' : 's'}`);
  out.push('');
  out.push(formatTable(
    ['layer', 'in', 'out', 'count', 'bits', 'group', 'in/group', 'rank', 'alpha', 'dropout', 'pool', 'dtype', 'base', 'adapter params'],
    spec.layers.map((l) => [
      l.name, l.inFeatures, l.outFeatures, l.count, l.bits, l.group, l.inFeatures / l.group, l.rank, l.alpha, l.dropout,
      l.pool, l.dtype, mib(baseBytes(l) * l.count), adapterParams(l) * l.count,
    ]),
  ));
  const base = spec.layers.reduce((s, l) => s + baseBytes(l) * l.count, 0);
  const params = spec.layers.reduce((s, l) => s + adapterParams(l) * l.count, 0);
  out.push('');
  out.push(`quantized linear weights: ${mib(base)}; adapter parameters: ${params.toLocaleString('en-US')}`);
  const t = spec.targets;
  out.push(`targets: ${[t.cpu ? 'cpu' : '', t.cuda ? `cuda (${t.cuda.archs.join(', ')})` : ''].filter(Boolean).join(', ')}`);
  return out.join('\n') + '\n';
}

export function register(program: Command): void {
  program
    .command('check')
    .description('check a spec: print its diagnostics and the layers it resolves to, without compiling')
    .argument('<spec>', 'spec file (.qal)')
    .option('--json', 'print the resolved spec as JSON instead of a table')
    .action((specPath: string, o: { json?: boolean }) => {
      const r = loadSpec(specPath);
      if (r.diagnostics.length) process.stderr.write(formatDiagnostics(r.diagnostics, r.sources) + summarize(r.diagnostics) + '\n');
      if (!r.spec) throw new QaloraError(`${specPath}: the spec has errors`);
      process.stdout.write(o.json ? JSON.stringify(r.spec, null, 2) + '\n' : describeSpec(r.spec));
    });
}
