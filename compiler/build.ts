// Stage 5: generated/<spec>/ → build/Release/qalora_<spec>.node with cmake-js. Cached by content: the hash of
// every generated file, the toolchain versions and the configure flags; when it matches the last successful
// build and the .node exists, nothing runs. A lock folder (atomic mkdir) makes concurrent builders of the
// same folder — parallel vitest workers — wait for one another instead of racing. What every spec compiles alike
// (shared/CMakeLists.txt: the core ops, the thread pool, the emulator's runtime) is built once per content into
// generated/cache/shared-<hash>/ and linked whole into each addon, so a spec costs only its own kernels.
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { hostname } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { AsyncLocalStorage } from 'node:async_hooks';

export interface BuildOptions {
  /** Parallel compile jobs (the machine has 2 cores). */
  jobs?: number;
  /** Leave the CUDA backend out even where nvcc exists (the emulator still builds). Default: QALORA_NO_CUDA=1. */
  noCuda?: boolean;
  /** Called with each line cmake prints. */
  onOutput?: (line: string) => void;
  /** Give up waiting for another builder's lock after this long. */
  lockTimeoutMs?: number;
  /** Where the shared libraries are built once per content (default generated/cache, or QALORA_SHARED_CACHE);
   * false compiles their sources into the addon itself, as a plain cmake-js build of the folder does. */
  sharedCache?: string | false;
}

export interface BuildResult {
  addonPath: string;
  /** True when the cache matched and cmake was not run. */
  cached: boolean;
  hash: string;
  ms: number;
  /** The shared-library folder this build linked (null: none, or compiled in; undefined when cached). */
  shared?: { dir: string; cached: boolean } | null;
}

export class BuildError extends Error {
  readonly userFacing = true;
  constructor(
    message: string,
    readonly log: string,
  ) {
    super(message);
    this.name = 'BuildError';
  }
}

export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');
export const generatedRoot = join(repoRoot, 'generated');

const STAMP = 'qalora-build.json';
const cmakeJsBin = createRequire(import.meta.url).resolve('cmake-js/bin/cmake-js');

let toolchainCache: string | undefined;
/** Versions of everything that turns sources into the .node; part of the cache key. */
export function toolchainFingerprint(): string {
  if (toolchainCache !== undefined) return toolchainCache;
  const version = (cmd: string) => {
    const r = spawnSync(cmd, ['--version'], { encoding: 'utf8' });
    return r.status === 0 ? r.stdout.trim().split('\n').slice(-2).join(' | ') : 'absent';
  };
  const cmakeJs = createRequire(import.meta.url)('cmake-js/package.json').version;
  toolchainCache = [
    `node-napi ${process.versions.napi} ${process.platform}-${process.arch}`,
    `cmake-js ${cmakeJs}`,
    `c++ ${version(process.env.CXX ?? 'c++')}`,
    `cmake ${version('cmake')}`,
    `nvcc ${version(process.env.CUDACXX ?? 'nvcc')}`,
  ].join('\n');
  return toolchainCache;
}

function listFiles(dir: string, skip: Set<string>): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir).sort()) {
    if (skip.has(name)) continue;
    const abs = join(dir, name);
    if (statSync(abs).isDirectory()) out.push(...listFiles(abs, new Set()));
    else out.push(abs);
  }
  return out;
}

/** The cache key of a generated folder: its sources (not build/), the toolchain and the flags. */
export function sourceHash(dir: string, opts: BuildOptions = {}): string {
  return withFlags(contentHash(dir), !!opts.noCuda);
}

function contentHash(dir: string): string {
  const h = createHash('sha256');
  h.update(toolchainFingerprint());
  for (const abs of listFiles(dir, new Set(['build', '.build-lock']))) {
    const rel = relative(dir, abs);
    if (rel === 'bindings.ts' || rel === 'manifest.json' || rel.endsWith('.tmp')) continue; // outputs for JS, not addon inputs
    h.update(rel).update('\0').update(readFileSync(abs)).update('\0');
  }
  return h.digest('hex');
}

const withFlags = (content: string, noCuda: boolean) => createHash('sha256').update(`${content}\nnoCuda=${noCuda}`).digest('hex');

export function addonPathOf(dir: string): string {
  const name = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')).name as string;
  return join(dir, 'build', 'Release', `${name}.node`);
}

function readStamp(dir: string): { hash: string; configure: string } | null {
  try {
    return JSON.parse(readFileSync(join(dir, 'build', STAMP), 'utf8'));
  } catch {
    return null;
  }
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

// Locks this process holds, by folder: a nested withBuildLock runs inside the outer one, and concurrent calls
// from one process queue here (the lock folder alone cannot tell them apart: they share a pid).
const held = new Map<string, { depth: number; queue: Promise<void> }>();
const lockContext = new AsyncLocalStorage<Set<string>>();

/** Runs fn holding dir/.build-lock (mkdir is atomic); a lock whose owner process is gone is stale and removed. */
export async function withBuildLock<T>(dir: string, timeoutMs: number, fn: () => Promise<T>): Promise<T> {
  const key = resolve(dir);
  const mine = lockContext.getStore();
  if (mine?.has(key)) return fn(); // re-entered from inside our own lock
  const entry = held.get(key) ?? { depth: 0, queue: Promise.resolve() };
  held.set(key, entry);
  entry.depth++;
  let release!: () => void;
  const prev = entry.queue;
  entry.queue = new Promise<void>((r) => (release = r));
  await prev;
  try {
    return await withFileLock(key, timeoutMs, () => lockContext.run(new Set([...(mine ?? []), key]), fn));
  } finally {
    release();
    if (--entry.depth === 0) held.delete(key);
  }
}

async function withFileLock<T>(dir: string, timeoutMs: number, fn: () => Promise<T>): Promise<T> {
  const lock = join(dir, '.build-lock');
  const owner = join(lock, 'owner.json');
  const start = Date.now();
  for (;;) {
    try {
      mkdirSync(lock);
      writeFileSync(owner, JSON.stringify({ pid: process.pid, host: hostname(), since: new Date().toISOString() }));
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      let info: { pid?: number; host?: string } | null = null;
      try {
        info = JSON.parse(readFileSync(owner, 'utf8'));
      } catch {
        /* the owner is between mkdir and writing owner.json, or died there */
      }
      const age = (() => {
        try {
          return Date.now() - statSync(lock).mtimeMs;
        } catch {
          return 0;
        }
      })();
      const stale = info?.pid !== undefined ? info.host === hostname() && !isAlive(info.pid) : age > 10_000;
      if (stale) {
        rmSync(lock, { recursive: true, force: true });
        continue;
      }
      if (Date.now() - start > timeoutMs)
        throw new BuildError(`timed out after ${Math.round(timeoutMs / 1000)} s waiting for the build lock ${lock} (held by ${JSON.stringify(info)})`, '');
      await new Promise((r) => setTimeout(r, 200));
    }
  }
  try {
    return await fn();
  } finally {
    rmSync(lock, { recursive: true, force: true });
  }
}

function runCmakeJs(args: string[], onOutput?: (line: string) => void): Promise<{ code: number; log: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [cmakeJsBin, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let log = '';
    let pending = '';
    const take = (chunk: Buffer) => {
      const text = chunk.toString();
      log += text;
      if (!onOutput) return;
      pending += text;
      const lines = pending.split('\n');
      pending = lines.pop() ?? '';
      lines.forEach((l) => onOutput(l));
    };
    child.stdout.on('data', take);
    child.stderr.on('data', take);
    child.on('error', reject);
    child.on('close', (code) => {
      if (pending && onOutput) onOutput(pending);
      resolve({ code: code ?? 1, log });
    });
  });
}

/** The lines of a failed build a human needs: compiler diagnostics and CMake errors, not the noise. */
export function errorLines(log: string): string[] {
  const lines = log.split('\n');
  const hits = lines.filter((l) => /(error|Error|ERROR|undefined reference|ptxas|fatal)/.test(l) && !/^\s*(info|ERR!|ERROR)\s+(CMD|RUN|OMG)\b/.test(l));
  return (hits.length ? hits : lines.slice(-30)).slice(0, 60);
}

/** The libraries of shared/CMakeLists.txt, as the cmake -D definitions that hand their archives to the addon. */
async function buildShared(dir: string, opts: BuildOptions): Promise<{ defs: string[]; shared: BuildResult['shared'] }> {
  const inputs = join(dir, 'shared', 'inputs.json');
  if (opts.sharedCache === false || !existsSync(inputs)) return { defs: [], shared: null };
  const src = (JSON.parse(readFileSync(inputs, 'utf8')) as { src: string[] }).src;
  const files = new Map<string, Buffer>([
    ['CMakeLists.txt', readFileSync(join(dir, 'shared', 'CMakeLists.txt'))],
    ['qalora.cmake', readFileSync(join(dir, 'qalora.cmake'))],
    ...src.map((f): [string, Buffer] => [`src/${f}`, readFileSync(join(dir, 'src', f))]),
  ]);
  const h = createHash('sha256').update(toolchainFingerprint());
  for (const [rel, content] of files) h.update(rel).update('\0').update(content).update('\0');
  const hash = h.digest('hex');
  const shared = join(opts.sharedCache ?? process.env.QALORA_SHARED_CACHE ?? join(generatedRoot, 'cache'), `shared-${hash.slice(0, 16)}`);
  try {
    mkdirSync(shared, { recursive: true });
  } catch {
    return { defs: [], shared: null }; // a read-only install: the addon compiles the sources itself
  }
  const archives = () =>
    ['cpu', 'emu']
      .map((lib) => ({ lib, path: join(shared, 'build', `libqalora_shared_${lib}.a`) }))
      .filter((a) => existsSync(a.path))
      .map((a) => `--CDQALORA_SHARED_${a.lib.toUpperCase()}=${a.path}`);
  if (readStamp(shared)?.hash === hash) return { defs: archives(), shared: { dir: shared, cached: true } };
  return withBuildLock(shared, opts.lockTimeoutMs ?? 30 * 60_000, async () => {
    if (readStamp(shared)?.hash === hash) return { defs: archives(), shared: { dir: shared, cached: true } };
    for (const [rel, content] of files) {
      mkdirSync(dirname(join(shared, rel)), { recursive: true });
      writeFileSync(join(shared, rel), content);
    }
    writeFileSync(join(shared, 'package.json'), JSON.stringify({ name: 'qalora_shared', private: true, binary: { napi_versions: [8] } }, null, 2) + '\n');
    const out = join(shared, 'build');
    rmSync(join(out, STAMP), { force: true });
    const common = ['--directory', shared, '--out', out, '--log-level', 'warn'];
    for (const step of [['configure', ...common], ['build', ...common, '--parallel', String(opts.jobs ?? 2)]]) {
      const r = await runCmakeJs(step, opts.onOutput);
      // The diagnostics name the spec folder's files, of which the shared folder holds copies.
      const lines = errorLines(r.log).map((l) => l.split(`${shared}/src/`).join(`${dir}/src/`));
      if (r.code !== 0) throw new BuildError(`build failed in ${dir} (its shared libraries, in ${shared}):\n${lines.join('\n')}`, r.log);
    }
    writeFileSync(join(out, STAMP), JSON.stringify({ hash, configure: '', builtAt: new Date().toISOString() }, null, 2));
    return { defs: archives(), shared: { dir: shared, cached: false } };
  });
}

export async function buildAddon(dir: string, options: BuildOptions = {}): Promise<BuildResult> {
  const start = Date.now();
  // Without CUDA sources the flag changes nothing, so it must not change the cache key either.
  const hasCudaSources = existsSync(join(dir, 'src', 'cuda'));
  const opts = { ...options, noCuda: hasCudaSources && (options.noCuda ?? process.env.QALORA_NO_CUDA === '1') };
  if (!existsSync(join(dir, 'CMakeLists.txt'))) throw new BuildError(`${dir} has no CMakeLists.txt: run \`qalora compile\` first`, '');
  const addonPath = addonPathOf(dir);
  // --no-cuda asks only not to need nvcc: an addon already built with CUDA from the same sources serves too,
  // so callers with and without it do not rebuild the folder back and forth.
  const fresh = () => {
    const content = contentHash(dir);
    const hash = withFlags(content, !!opts.noCuda);
    const stamp = readStamp(dir)?.hash;
    const hit = existsSync(addonPath) && (stamp === hash || (!!opts.noCuda && stamp === withFlags(content, false)));
    return { hash: hit ? stamp! : hash, hit };
  };
  const first = fresh();
  if (first.hit) return { addonPath, cached: true, hash: first.hash, ms: Date.now() - start };

  return withBuildLock(dir, opts.lockTimeoutMs ?? 30 * 60_000, async () => {
    const now = fresh(); // another builder may have finished while we waited
    if (now.hit) return { addonPath, cached: true, hash: now.hash, ms: Date.now() - start };
    const out = join(dir, 'build');
    const { defs, shared } = await buildShared(dir, opts);
    const configure = [`noCuda=${!!opts.noCuda}`, ...defs].join(' ');
    const common = ['--directory', dir, '--out', out, '--log-level', 'warn'];
    // An unset archive variable is written empty, so a build that stops linking one compiles its sources again.
    const cacheDefs = [`--CDQALORA_NO_CUDA=${opts.noCuda ? 'ON' : 'OFF'}`, ...['CPU', 'EMU'].map((l) => defs.find((d) => d.startsWith(`--CDQALORA_SHARED_${l}=`)) ?? `--CDQALORA_SHARED_${l}=`)];
    // Configure explicitly when there is no cache yet or the flags changed; cmake re-runs itself on a
    // changed CMakeLists.txt, so other edits need only `build`.
    if (readStamp(dir)?.configure !== configure || !existsSync(join(out, 'CMakeCache.txt'))) {
      const r = await runCmakeJs(['configure', ...common, ...cacheDefs], opts.onOutput);
      if (r.code !== 0) throw new BuildError(`cmake configure failed in ${dir}:\n${errorLines(r.log).join('\n')}`, r.log);
    }
    rmSync(join(out, STAMP), { force: true });
    const r = await runCmakeJs(['build', ...common, '--parallel', String(opts.jobs ?? 2)], opts.onOutput);
    if (r.code !== 0 || !existsSync(addonPath))
      throw new BuildError(`build failed in ${dir}:\n${errorLines(r.log).join('\n')}`, r.log);
    writeFileSync(join(out, STAMP), JSON.stringify({ hash: now.hash, configure, addon: addonPath, builtAt: new Date().toISOString() }, null, 2));
    return { addonPath, cached: false, hash: now.hash, ms: Date.now() - start, shared };
  });
}
