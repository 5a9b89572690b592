// `qalora inspect SPEC [--kernel NAME] [--arch sm_90] [--cpu]`: the emitted CUDA of a specialization (its
// region of kernels.cu, constants first) and, per kernel and arch, registers, spills, shared memory and SASS size.
import type { Command } from 'commander';
import { inspectSpec, nvccAvailable, NVCC } from '../../compiler/inspect.ts';
import { loadSpecOrFail } from '../../compiler/spec-file.ts';
import { QaloraError } from '../errors.ts';

export function register(program: Command): void {
  program
    .command('inspect')
    .description('show the emitted CUDA of a kernel specialization with ptxas registers, spills, shared memory and SASS size per arch (or the CPU source with --cpu)')
    .argument('<spec>', 'spec file (.qal)')
    .option('-k, --kernel <name>', 'specialization id (e.g. b4_g32_fp16_mean) or layer name (e.g. q, down); default: all')
    .option('-a, --arch <arch...>', "arch(s) to compile for, e.g. sm_90 (default: the spec's cuda archs)")
    .option('--cpu', 'show the CPU source of the specialization instead')
    .option('--keep <dir>', 'keep the rendered sources and cubins in this folder')
    .action(async (specPath: string, o: { kernel?: string; arch?: string[]; cpu?: boolean; keep?: string }) => {
      const spec = loadSpecOrFail(specPath);
      if (!o.cpu && !nvccAvailable()) throw new QaloraError(`nvcc not found (${NVCC}); set NVCC or use --cpu`);
      const r = await inspectSpec(spec, { kernel: o.kernel, archs: o.arch, cpu: o.cpu, workDir: o.keep });
      process.stdout.write(r.text + '\n');
    });
}
