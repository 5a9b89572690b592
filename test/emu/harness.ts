// Builds test programs against the CUDA emulator (templates/emu) with g++, cached by content hash under
// build/emu-test/, and runs them. The emulator's runtime sources are compiled once per flavour (plain, ASan).
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { repoRoot } from '../fixtures.ts';

const run = promisify(execFile);

export const emuDir = join(repoRoot, 'templates', 'emu');
export const cudaInclude = join(process.env.CUDA_HOME ?? '/usr/local/cuda', 'include');
const buildRoot = join(repoRoot, 'build', 'emu-test');

export type Flavour = 'plain' | 'asan';
// Every load and store through a pointer is checked against its type's alignment in both flavours: a GPU faults
// on a misaligned vector access (a uint4 or an alignas(16) struct read through a cast), which a CPU forgives.
const alignment = ['-fsanitize=alignment', '-fno-sanitize-recover=alignment'];
const flavourFlags: Record<Flavour, string[]> = {
  plain: ['-O1', '-g', ...alignment],
  asan: ['-O1', '-g', '-fsanitize=address', '-fno-omit-frame-pointer', ...alignment],
};
const commonFlags = () => ['-std=c++17', '-Wall', '-Wno-sign-compare', `-I${cudaInclude}`, `-I${emuDir}`];

// At most two compilers at once (the machine has two cores; other test files build too).
let active = 0;
const waiting: (() => void)[] = [];
async function limited<T>(job: () => Promise<T>): Promise<T> {
  while (active >= 2) await new Promise<void>((r) => waiting.push(r));
  active++;
  try {
    return await job();
  } finally {
    active--;
    waiting.shift()?.();
  }
}

function hash(...parts: string[]): string {
  const h = createHash('sha256');
  for (const p of parts) h.update(p).update('\0');
  return h.digest('hex').slice(0, 16);
}

function runtimeSources(): string[] {
  return readdirSync(emuDir)
    .filter((f) => f.endsWith('.cpp'))
    .sort();
}

function emulatorHash(): string {
  const files = readdirSync(emuDir).filter((f) => /\.(h|cpp)$/.test(f)).sort();
  return hash(...files.flatMap((f) => [f, readFileSync(join(emuDir, f), 'utf8')]));
}

/** g++ with an output written atomically (parallel test workers may build the same file). */
async function compile(args: string[], out: string): Promise<void> {
  if (existsSync(out)) return;
  const tmp = `${out}.${process.pid}.${Math.random().toString(36).slice(2)}`;
  await limited(() => run('g++', [...args, '-o', tmp], { maxBuffer: 1 << 24 }));
  renameSync(tmp, out);
}

const objectCache = new Map<string, Promise<string[]>>();
function runtimeObjects(flavour: Flavour): Promise<string[]> {
  const key = `${flavour}-${emulatorHash()}`;
  let p = objectCache.get(key);
  if (!p) {
    const dir = join(buildRoot, `runtime-${key}`);
    mkdirSync(dir, { recursive: true });
    p = Promise.all(
      runtimeSources().map(async (src) => {
        const obj = join(dir, src.replace(/\.cpp$/, '.o'));
        await compile([...commonFlags(), ...flavourFlags[flavour], '-c', join(emuDir, src)], obj);
        return obj;
      }),
    );
    objectCache.set(key, p);
  }
  return p;
}

/** Compiles CUDA source text (named `name`, so reports show name:line) into an emulated executable. */
export async function buildProgram(name: string, source: string, flavour: Flavour = 'plain'): Promise<string> {
  const objects = await runtimeObjects(flavour);
  const dir = join(buildRoot, `${name}-${flavour}-${hash(source, emulatorHash())}`);
  mkdirSync(dir, { recursive: true });
  const src = join(dir, name);
  const exe = join(dir, 'program');
  if (!existsSync(src)) writeFileSync(src, source);
  await compile([...commonFlags(), ...flavourFlags[flavour], '-x', 'c++', src, '-x', 'none', ...objects, '-lpthread'], exe);
  return exe;
}

/** Compiles a C++ file (with extra include folders) against the emulator into an executable next to it. */
export async function buildFile(source: string, includeDirs: string[], flavour: Flavour = 'plain'): Promise<string> {
  const objects = await runtimeObjects(flavour);
  const exe = source.replace(/\.[^./]+$/, '') + `-${flavour}-${emulatorHash()}`;
  const includes = includeDirs.map((d) => `-I${d}`);
  await compile([...commonFlags(), ...flavourFlags[flavour], ...includes, '-x', 'c++', source, '-x', 'none', ...objects, '-lpthread'], exe);
  return exe;
}

/** Compiles source text against the emulator without linking; resolves to the compiler's diagnostics. */
export async function compileOnly(source: string): Promise<{ ok: boolean; stderr: string }> {
  const dir = join(buildRoot, 'syntax');
  mkdirSync(dir, { recursive: true });
  const src = join(dir, `${hash(source)}.cu`);
  writeFileSync(src, source);
  try {
    await limited(() => run('g++', [...commonFlags(), '-fsyntax-only', '-x', 'c++', src], { maxBuffer: 1 << 24 }));
    return { ok: true, stderr: '' };
  } catch (e) {
    return { ok: false, stderr: String((e as { stderr?: string }).stderr ?? e) };
  }
}

export interface RunResult {
  code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
}

export async function runProgram(exe: string, args: string[], env: Record<string, string> = {}): Promise<RunResult> {
  try {
    const { stdout, stderr } = await run(exe, args, {
      env: { ...process.env, ASAN_OPTIONS: 'detect_leaks=0', ...env },
      maxBuffer: 1 << 24,
      timeout: 120_000,
    });
    return { code: 0, signal: null, stdout, stderr };
  } catch (e) {
    const x = e as { code?: number; signal?: string; stdout?: string; stderr?: string };
    return {
      code: typeof x.code === 'number' ? x.code : null,
      signal: x.signal ?? null,
      stdout: x.stdout ?? '',
      stderr: x.stderr ?? '',
    };
  }
}

/** The source with the line tagged `// @tag` replaced (or removed); throws if the tag is missing. */
export function variant(source: string, tag: string, replacement = ''): string {
  const lines = source.split('\n');
  const i = lines.findIndex((l) => l.includes(`// @${tag}`));
  if (i < 0) throw new Error(`tag @${tag} not found`);
  lines[i] = replacement;
  return lines.join('\n');
}

/** 1-based line number of the line tagged `// @tag`. */
export function tagLine(source: string, tag: string): number {
  const i = source.split('\n').findIndex((l) => l.includes(`// @${tag}`));
  if (i < 0) throw new Error(`tag @${tag} not found`);
  return i + 1;
}
