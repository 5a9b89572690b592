// `qalora train --nproc N [--hostfile F]`: starts mpirun for the user with this same command line (less those
// two flags), so each rank is `node bin/qalora.mjs train …` and finds its place from mpirun's environment.
import { spawn } from 'node:child_process';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../assets.ts';
import { QaloraError } from '../errors.ts';
import { findMpirun, MPI_INSTALL_HINT } from '../mpi.ts';

/** argv after the command name, without --nproc/--hostfile (in either `--flag v` or `--flag=v` form). */
export function withoutLaunchFlags(args: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '--nproc' || args[i] === '--hostfile') i++;
    else if (!args[i].startsWith('--nproc=') && !args[i].startsWith('--hostfile=')) out.push(args[i]);
  }
  return out;
}

/** The mpirun command line; threads per rank split this machine's cores unless QALORA_THREADS is set. */
export function mpirunArgs(nproc: number, trainArgs: string[], o: { openMpi: boolean; hostfile?: string; root: boolean; threads: number }): string[] {
  const rank = [process.execPath, join(repoRoot, 'bin', 'qalora.mjs'), 'train', ...trainArgs];
  if (!o.openMpi) {
    // MPICH / Intel MPI (Hydra)
    return ['-n', String(nproc), ...(o.hostfile ? ['-f', o.hostfile] : []), '-genv', 'QALORA_THREADS', String(o.threads), ...rank];
  }
  return [
    ...(o.root ? ['--allow-run-as-root'] : []),
    // One machine: the user asked for N ranks whatever Open MPI counts as slots, and each rank runs its own
    // thread pool, which binding to one core would squeeze onto it.
    ...(o.hostfile ? ['--hostfile', o.hostfile] : ['--oversubscribe', '--bind-to', 'none']),
    '-n', String(nproc), '-x', `QALORA_THREADS=${o.threads}`, ...rank,
  ];
}

/** Runs the job to its end; resolves to mpirun's exit status. */
export async function launchRanks(nproc: number, args: string[], hostfile?: string): Promise<number> {
  if (!Number.isInteger(nproc) || nproc < 1) throw new QaloraError(`--nproc: expected a positive integer, got ${nproc}`);
  const mpirun = findMpirun();
  if (!mpirun) throw new QaloraError(`--nproc ${nproc} starts the ranks with mpirun, which is not installed; ${MPI_INSTALL_HINT}`);
  const threads = Number(process.env.QALORA_THREADS) > 0 ? Number(process.env.QALORA_THREADS) : Math.max(1, Math.floor(availableParallelism() / nproc));
  const trainArgs = withoutLaunchFlags(args);
  const argv = mpirunArgs(nproc, trainArgs, { openMpi: mpirun.openMpi, hostfile, root: process.getuid?.() === 0, threads });
  process.stderr.write(`qalora: ${mpirun.path} ${argv.slice(0, argv.indexOf(process.execPath)).join(' ')} … (${nproc} ranks, ${threads} thread${threads > 1 ? 's' : ''} each)\n`);
  const child = spawn(mpirun.path, argv, { stdio: 'inherit' });
  // Ctrl-C reaches mpirun too (same process group); it decides how the ranks stop, we wait for it.
  const ignore = () => {};
  process.on('SIGINT', ignore);
  try {
    const code = await new Promise<number>((res, rej) => {
      child.on('error', rej);
      child.on('exit', (c, sig) => res(c ?? (sig ? 128 : 1)));
    });
    if (code !== 0) {
      const i = trainArgs.indexOf('--out');
      const out = i >= 0 ? trainArgs[i + 1] : undefined;
      process.stderr.write(
        `qalora: the ${nproc}-rank job failed (status ${code}; mpirun's message above names the rank)` +
          (out ? `; the last checkpoint in ${join(out, 'checkpoint')} is intact: continue with --resume --out ${out} --nproc ${nproc}` : '') + '\n',
      );
    }
    return code;
  } finally {
    process.off('SIGINT', ignore);
  }
}
