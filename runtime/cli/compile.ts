// `qalora compile SPEC [-o DIR]`: spec → generated sources, bindings and manifest; prints the specializations.
import type { Command } from 'commander';
import { compileSpec, defaultOutDir } from '../../compiler/index.ts';
import type { KernelPlan } from '../../compiler/ir.ts';
import { loadSpecOrFail } from '../../compiler/spec-file.ts';
import { formatTable } from '../../compiler/table.ts';

export function specializationTable(plan: KernelPlan): string {
  return formatTable(
    ['kernel', 'bits', 'group', 'dtype', 'pool', 'fast', 'cpu MC×NC×KC', 'cuda BM×BN×BK/stages', 'layers'],
    plan.specializations.map((s) => [
      s.id,
      s.bits,
      s.group,
      s.dtype,
      s.pool,
      s.group % 32 === 0 ? 'yes' : 'no',
      s.cpu ? `${s.cpu.mc}×${s.cpu.nc}×${s.cpu.kc}` : '-',
      s.cuda ? `${s.cuda.gemm.bm}×${s.cuda.gemm.bn}×${s.cuda.gemm.bk}/${s.cuda.gemm.stages}` : '-',
      s.layers.join(' '),
    ]),
  );
}

export function register(program: Command): void {
  program
    .command('compile')
    .description('compile a spec to kernel sources, CMakeLists.txt, typed bindings and a manifest in generated/<spec>/')
    .argument('<spec>', 'spec file (.qal)')
    .option('-o, --out <dir>', 'output folder (default generated/<spec name>)')
    .action(async (specPath: string, o: { out?: string }) => {
      const spec = loadSpecOrFail(specPath);
      const r = await compileSpec(spec, o.out ?? defaultOutDir(spec));
      const t = r.timings;
      process.stdout.write(
        `${specializationTable(r.plan)}\n\n` +
          `${r.plan.layers.length} layers → ${r.plan.specializations.length} specializations; ${r.files.length} files in ${r.dir} ` +
          `(${r.changed.length} changed)\n` +
          `compiled in ${t.totalMs.toFixed(0)} ms (plan ${t.planMs.toFixed(1)}, render ${t.renderMs.toFixed(1)}, bindings ${t.bindingsMs.toFixed(0)}, write ${t.writeMs.toFixed(1)})\n`,
      );
    });
}
