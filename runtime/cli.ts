// `qalora`: the command-line interface. Each subcommand lives in runtime/cli/<name>.ts and exports
// `register(program)`; this file only assembles them, so a command is found by its file name.
import { Command } from 'commander';
import { readFileSync } from 'node:fs';

const commands = [
  'check', 'compile', 'build', 'inspect', 'exec',
  'generate', 'quantize', 'train', 'eval', 'merge', 'export', 'demo', 'serve',
] as const;

export async function main(argv: string[]): Promise<void> {
  const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8'));
  const program = new Command('qalora')
    .description('QA-LoRA compiler and runtime: compile layer specs to CPU/CUDA kernels, fine-tune a LLaMA on an INT-b base, merge, export and serve it.')
    .version(pkg.version)
    .showHelpAfterError();
  for (const name of commands) {
    let mod: { register?: (p: Command) => void };
    try {
      mod = await import(`./cli/${name}.ts`);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ERR_MODULE_NOT_FOUND' && String(e).includes(`cli/${name}.ts`)) continue;
      throw e;
    }
    mod.register?.(program);
  }
  try {
    await program.parseAsync(argv);
  } catch (e) {
    const err = e as Error & { userFacing?: boolean };
    process.stderr.write(`qalora: ${err.userFacing ? err.message : err.stack ?? err.message}\n`);
    process.exitCode = 1;
  }
}
