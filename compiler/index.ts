// The compiler's entry point: ResolvedSpec → generated/<spec>/ (sources, CMakeLists.txt, manifest.json,
// bindings.ts), stage by stage with timings. Files are written only when their content changed, so an
// unchanged spec leaves every mtime (and therefore the native build) alone.
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import type { ResolvedSpec } from '../dsl/resolved.ts';
import { emitBindings } from './bindings.ts';
import { buildAddon, generatedRoot, withBuildLock, type BuildOptions, type BuildResult } from './build.ts';
import type { KernelPlan } from './ir.ts';
import { buildManifest, type Manifest } from './manifest.ts';
import { compilerVersion, planSpec } from './plan.ts';
import { renderSources, targetName, type RenderedFile, type RenderOptions } from './render.ts';

export { planSpec, compilerVersion } from './plan.ts';
export { buildAddon, type BuildOptions, type BuildResult, BuildError } from './build.ts';

/** compileSpec then buildAddon, both under the folder's build lock, so concurrent callers (vitest workers
 * loading the same spec) neither write the same sources at once nor build twice. */
export async function compileAndBuild(spec: ResolvedSpec, outDir: string, opts: CompileOptions & BuildOptions = {}): Promise<{ compiled: CompileResult; built: BuildResult }> {
  const dir = resolve(outDir);
  mkdirSync(dir, { recursive: true });
  return withBuildLock(dir, opts.lockTimeoutMs ?? 30 * 60_000, async () => {
    const compiled = await compileSpec(spec, dir, opts);
    return { compiled, built: await buildAddon(dir, opts) };
  });
}

export { repoRoot, generatedRoot } from './build.ts';

export function defaultOutDir(spec: ResolvedSpec): string {
  return join(generatedRoot, spec.name);
}

export interface CompileOptions extends RenderOptions {
  /** Skip bindings.ts; loadKernels does not need it. */
  bindings?: boolean;
}

export interface CompileResult {
  plan: KernelPlan;
  dir: string;
  /** Every file written or kept, relative to dir. */
  files: string[];
  /** Files whose content changed in this run. */
  changed: string[];
  manifest: Manifest;
  addonFile: string;
  timings: { planMs: number; renderMs: number; bindingsMs: number; writeMs: number; totalMs: number };
}

/** Writes through a temporary file and a rename so a concurrent reader never sees half a file. */
function writeIfChanged(abs: string, content: string): boolean {
  if (existsSync(abs) && readFileSync(abs, 'utf8') === content) return false;
  mkdirSync(dirname(abs), { recursive: true });
  const tmp = `${abs}.${process.pid}.tmp`;
  writeFileSync(tmp, content);
  renameSync(tmp, abs);
  return true;
}

function listRel(dir: string, base: string): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir).flatMap((n) => {
    const abs = join(dir, n);
    return statSync(abs).isDirectory() ? listRel(abs, base) : [relative(base, abs)];
  });
}

export async function compileSpec(spec: ResolvedSpec, outDir: string = defaultOutDir(spec), opts: CompileOptions = {}): Promise<CompileResult> {
  const t0 = performance.now();
  const plan = planSpec(spec);
  const t1 = performance.now();
  const rendered = renderSources(plan, compilerVersion, opts);
  const t2 = performance.now();
  const addonFile = `build/Release/${targetName(plan)}.node`;
  const files: RenderedFile[] = [...rendered.files];
  const paths = [...files.map((f) => f.path), 'manifest.json', ...(opts.bindings === false ? [] : ['bindings.ts'])];
  const manifest = buildManifest(plan, rendered.backends, rendered.ops, paths);
  files.push({ path: 'manifest.json', content: JSON.stringify(manifest, null, 2) + '\n' });
  let bindingsMs = 0;
  const dir = resolve(outDir);
  if (opts.bindings !== false) {
    const b0 = performance.now();
    const input = { plan, ops: rendered.ops, backends: rendered.backends, addonFile };
    files.push({ path: 'bindings.ts', content: await emitBindings(input) });
    bindingsMs = performance.now() - b0;
  }
  const t3 = performance.now();
  const changed = files.filter((f) => writeIfChanged(join(dir, f.path), f.content)).map((f) => f.path);
  // Sources from templates that no longer exist must not linger in the build.
  const keep = new Set(files.map((f) => f.path));
  // (Another process's half-written temporary file is not stale: leave *.tmp alone.)
  for (const rel of listRel(join(dir, 'src'), dir)) if (!keep.has(rel) && !rel.endsWith('.tmp')) rmSync(join(dir, rel), { force: true });
  const t4 = performance.now();
  return {
    plan,
    dir,
    files: files.map((f) => f.path),
    changed,
    manifest,
    addonFile,
    timings: { planMs: t1 - t0, renderMs: t2 - t1, bindingsMs, writeMs: t4 - t3, totalMs: t4 - t0 },
  };
}
