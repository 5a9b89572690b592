// `qalora inspect SPEC [--kernel NAME] [--arch sm_90] [--ptx] [--sass] [--cpu]`: the emitted CUDA of a
// specialization (its region of kernels.cu, constants first, then the kernel templates it instantiates) and, per
// kernel and arch, registers, spills, shared memory and SASS size; on request the PTX and SASS of each kernel.
import type { Command } from 'commander';
import { sassTool } from '../../compiler/disasm.ts';
import { inspectSpec, nvccAvailable, NVCC } from '../../compiler/inspect.ts';
import { loadSpecOrFail } from '../../compiler/spec-file.ts';
import { QaloraError } from '../errors.ts';

export function register(program: Command): void {
  program
    .command('inspect')
    .description('show the emitted CUDA of a kernel specialization (its Config and the kernel bodies it instantiates) with ptxas registers, spills, shared memory and SASS size per arch, and on request its PTX and SASS (or the CPU source with --cpu)')
    .argument('<spec>', 'spec file (.qal)')
    .option('-k, --kernel <name>', 'specialization id (e.g. b4_g32_fp16_mean) or layer name (e.g. q, down); default: all')
    .option('-a, --arch <arch...>', "arch(s) to compile for, e.g. sm_90 (default: the spec's cuda archs)")
    .option('--ptx', "also print each kernel's PTX per arch (what nvcc generated for the cubin)")
    .option('--sass', "also print each kernel's SASS per arch (cuobjdump -sass or nvdisasm on the cubin)")
    .option('--cpu', 'show the CPU source of the specialization instead')
    .option('--keep <dir>', 'keep the rendered sources and cubins in this folder')
    .action(async (specPath: string, o: { kernel?: string; arch?: string[]; cpu?: boolean; keep?: string; ptx?: boolean; sass?: boolean }) => {
      const spec = loadSpecOrFail(specPath);
      if (!o.cpu && !nvccAvailable()) throw new QaloraError(`nvcc not found (${NVCC}); set NVCC or use --cpu`);
      // Before minutes of nvcc: a SASS listing needs a disassembler the pip toolkit does not ship.
      if (o.sass && !o.cpu && !sassTool(NVCC))
        throw new QaloraError(`--sass needs cuobjdump or nvdisasm from the CUDA toolkit; neither is next to ${NVCC}, in $CUDA_HOME/bin or on PATH (--ptx works without them)`);
      const r = await inspectSpec(spec, { kernel: o.kernel, archs: o.arch, cpu: o.cpu, workDir: o.keep, ptx: o.ptx, sass: o.sass });
      process.stdout.write(r.text + '\n');
    });
}
