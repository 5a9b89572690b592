// MPI for data-parallel training: the API of the small fixed addon in templates/mpi/ (declared here, once),
// where its sources are staged and built (generated/_mpi/, on first use, cached like a spec's addon), and how a
// process tells that mpirun started it. Nothing here loads or needs MPI unless a job really has several ranks,
// so a machine without MPI builds and runs everything else as before.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, realpathSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { buildAddon, BuildError } from '../compiler/build.ts';
import { repoRoot } from './assets.ts';
import { QaloraError } from './errors.ts';
import { loadAddonFile } from './native.ts';

/** templates/mpi/mpi_addon.cpp, as JS sees it. Collectives are on MPI_COMM_WORLD and block. */
export interface MpiAddon {
  /** MPI_Init_thread once (later calls only return the same facts); `timeoutSeconds` arms the hang watchdog (0: off). */
  init(timeoutSeconds?: number): { rank: number; size: number; host: string; library: string; reopened: string };
  /** In place: every rank ends with Σ over ranks, added in rank order (reproducible for a given N). */
  allreduceSum(buf: Float32Array | Float64Array): void;
  /** In place: every rank ends with `root`'s bytes. */
  broadcast(buf: ArrayBufferView, root: number): void;
  barrier(): void;
  /** MPI_Abort: ends every rank of the job. */
  abort(code?: number): never;
  finalize(): void;
}

export const MPI_INSTALL_HINT =
  'install MPI: Debian/Ubuntu `apt-get install -y libopenmpi-dev openmpi-bin` (or MPICH: `libmpich-dev mpich`); ' +
  'Fedora `dnf install openmpi-devel`; macOS `brew install open-mpi`';

/** This process's place in an MPI job, from the variables mpirun sets (Open MPI, MPICH/Hydra, PMIx); null outside one. */
export function launchedRank(env: NodeJS.ProcessEnv = process.env): { rank: number; size: number } | null {
  const pairs: [string, string][] = [['OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE'], ['PMI_RANK', 'PMI_SIZE'], ['PMIX_RANK', 'PMIX_SIZE']];
  for (const [r, s] of pairs) {
    if (env[r] !== undefined && env[s] !== undefined) return { rank: Number(env[r]), size: Number(env[s]) };
  }
  return null;
}

/** The mpirun on PATH and which implementation it is; null when there is none. */
export function findMpirun(): { path: string; openMpi: boolean; version: string } | null {
  const r = spawnSync('mpirun', ['--version'], { encoding: 'utf8' });
  if (r.error || r.status !== 0) return null;
  const version = (r.stdout + r.stderr).trim().split('\n')[0] ?? '';
  const which = spawnSync('sh', ['-c', 'command -v mpirun'], { encoding: 'utf8' }).stdout.trim();
  return { path: which || 'mpirun', openMpi: /open mpi|open-mpi|openrte/i.test(version), version };
}

const mpiDir = join(repoRoot, 'generated', '_mpi');
const templateDir = join(repoRoot, 'templates', 'mpi');

/** Copies templates/mpi/ to generated/_mpi/ (only what changed: the build cache hashes these files). */
function stage(): void {
  mkdirSync(mpiDir, { recursive: true });
  const put = (name: string, content: string | Buffer) => {
    const path = join(mpiDir, name);
    if (!existsSync(path) || !readFileSync(path).equals(Buffer.from(content))) writeFileSync(path, content);
  };
  for (const name of readdirSync(templateDir)) put(name, readFileSync(join(templateDir, name)));
  const napi = join(repoRoot, 'node_modules', 'node-addon-api');
  put('paths.cmake', `set(QL_NAPI_INCLUDE "${existsSync(napi) ? realpathSync(napi) : napi}")\n`);
  put('package.json', JSON.stringify({ name: 'qalora_mpi', private: true, binary: { napi_versions: [8] } }, null, 2) + '\n');
}

let cached: MpiAddon | undefined;

/** Builds (once; cached by content) and loads the MPI addon. Fails with what to install when MPI is missing. */
export async function loadMpi(): Promise<MpiAddon> {
  if (cached) return cached;
  stage();
  let built;
  try {
    built = await buildAddon(mpiDir);
  } catch (e) {
    if (e instanceof BuildError && /MPI was not found/.test(e.message)) throw new QaloraError(`MPI is not installed: ${MPI_INSTALL_HINT}`);
    throw e;
  }
  cached = loadAddonFile(built.addonPath, built.hash) as unknown as MpiAddon;
  return cached;
}

export const MPI_ADDON_DIR = mpiDir;
