// `qalora build SPEC`: compile, then build the addon with cmake-js (a no-op when nothing changed).
import type { Command } from 'commander';
import { compileAndBuild, defaultOutDir } from '../../compiler/index.ts';
import { loadSpecOrFail } from '../../compiler/spec-file.ts';
import { loadAddonFile } from '../native.ts';

export function register(program: Command): void {
  program
    .command('build')
    .description('compile a spec and build its native addon (cached by content hash: an unchanged spec is a no-op)')
    .argument('<spec>', 'spec file (.qal)')
    .option('-o, --out <dir>', 'output folder (default generated/<spec name>)')
    .option('-j, --jobs <n>', 'parallel compile jobs', '2')
    .option('--no-cuda', 'leave the CUDA backend out even where nvcc exists')
    .option('-v, --verbose', 'print every line of the build')
    .action(async (specPath: string, o: { out?: string; jobs: string; cuda: boolean; verbose?: boolean }) => {
      const spec = loadSpecOrFail(specPath);
      const { compiled, built: r } = await compileAndBuild(spec, o.out ?? defaultOutDir(spec), {
        jobs: Number(o.jobs),
        noCuda: o.cuda ? undefined : true,
        // ninja prints "[3/12] Building CXX object …": those lines are the progress.
        onOutput: (line) => {
          if (o.verbose || /^\[\d+\/\d+\]/.test(line)) process.stderr.write(`  ${line}\n`);
        },
      });
      const addon = loadAddonFile(r.addonPath, r.hash);
      process.stderr.write(`compiled ${spec.name} in ${compiled.timings.totalMs.toFixed(0)} ms\n`);
      process.stdout.write(
        (r.cached ? `up to date (cache hit ${r.hash.slice(0, 12)}): ` : `built in ${(r.ms / 1000).toFixed(1)} s: `) +
          `${r.addonPath}\nbackends: ${addon.backends().join(', ') || 'none'}\ncuda: ${addon.cudaStatus()}\n`,
      );
    });
}
