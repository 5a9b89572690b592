// Stage 2: KernelPlan → source files. One shared base walks a template folder and renders every *.njk with
// nunjucks (copying other files verbatim); each target only says which folder, which specializations it sees
// and what extra context it needs. Nothing here knows what a kernel looks like.
import type nunjucks from 'nunjucks';
import { existsSync, readdirSync, readFileSync, realpathSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { KernelPlan, Specialization } from './ir.ts';
import { EMU_COUNTERS } from './emu-counters.ts';
import { environment } from './nunjucks-env.ts';
import { loadOpDescriptors, opWrapperContext, type OpDescriptor } from './ops.ts';

export const defaultTemplateRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', 'templates');
// Canonical (symlinks resolved): the path is written into CMakeLists.txt and so into the build's cache key, which
// must not change with the way node_modules is reached (test/fresh-clone.test.ts links a copy to this one).
const napiPath = resolve(dirname(fileURLToPath(import.meta.url)), '..', 'node_modules', 'node-addon-api');
const napiInclude = existsSync(napiPath) ? realpathSync(napiPath) : napiPath;

/** A generated file, path relative to generated/<spec>/. */
export interface RenderedFile {
  path: string;
  content: string;
  /** Copied unchanged from the templates (not rendered from a .njk): the same for every spec. */
  verbatim?: boolean;
}

export interface RenderOptions {
  /** Folder holding common/, cpu/, cuda/, emu/, core/, addon/, cmake/ (tests pass a scratch one). */
  templateRoot?: string;
}

type Backend = 'cpu' | 'cuda' | 'emu';

const withCpu = (p: KernelPlan) => p.specializations.filter((s) => s.cpu !== null);
const withCuda = (p: KernelPlan) => p.specializations.filter((s) => s.cuda !== null);
const hasCuda = (p: KernelPlan) => p.spec.targets.cuda !== null;

/** What the kernel sources turned out to be; the addon and cmake renderers are built from it. */
interface SourceLayout {
  files: RenderedFile[];
  /** Paths under src/: the sources rendered for this spec, and the verbatim ones every spec compiles alike. */
  cpuSources: string[];
  sharedCpuSources: string[];
  cudaSources: string[];
  emuSources: string[];
  sharedEmuSources: string[];
  backends: Array<{ name: Backend; specializations: Specialization[] }>;
  ops: OpDescriptor[];
}

/** One target: which template folder, where its output goes, and the context it adds to { plan, version }. */
interface TargetRenderer {
  dir: string;
  enabled(plan: KernelPlan): boolean;
  /** Output path of a template-relative file (default src/<dir>/<file>). */
  outPath?(rel: string): string;
  context(plan: KernelPlan, layout: SourceLayout): Record<string, unknown>;
}

const kernelTarget = (dir: string, specs: (p: KernelPlan) => Specialization[], enabled = (_p: KernelPlan) => true): TargetRenderer => ({
  dir,
  enabled,
  context: (plan) => ({ specializations: specs(plan) }),
});

// The kernel sources. cpu and core are always rendered: core ops and CPU probes exist in every addon,
// spec-less ones included; cuda and emu only for a spec with a cuda target.
const sourceTargets: TargetRenderer[] = [
  kernelTarget('common', (p) => p.specializations),
  kernelTarget('cpu', withCpu),
  kernelTarget('core', withCpu),
  kernelTarget('cuda', withCuda, hasCuda),
  kernelTarget('emu', withCuda, hasCuda),
];

// The glue, rendered from what the sources turned out to be.
const addonTarget: TargetRenderer = {
  dir: 'addon',
  enabled: () => true,
  context: (plan, l) => ({
    specializations: plan.specializations,
    backends: l.backends.map((b) => ({ name: b.name, macro: `QALORA_HAVE_${b.name.toUpperCase()}`, specializations: b.specializations })),
    ops: l.ops.map(opWrapperContext),
    emuCounters: EMU_COUNTERS,
  }),
};

const cmakeTarget: TargetRenderer = {
  dir: 'cmake',
  enabled: () => true,
  outPath: (rel) => rel, // CMakeLists.txt sits at the top of generated/<spec>/
  context: (plan, l) => {
    const live = (b: Backend) => l.backends.some((x) => x.name === b);
    return {
      specializations: plan.specializations,
      target: targetName(plan),
      napiInclude,
      cpuSources: l.cpuSources,
      sharedCpuSources: l.sharedCpuSources,
      haveCpu: live('cpu'),
      haveCuda: live('cuda'),
      cudaSources: l.cudaSources,
      cudaArchs: (plan.spec.targets.cuda?.archs ?? []).map((a) => a.replace(/^sm_/, '')),
      cudaMissing: !hasCuda(plan) ? 'the spec has no cuda target' : 'templates/cuda has no .cu sources',
      haveEmu: live('emu'),
      emuSources: live('emu') ? l.emuSources : [],
      sharedEmuSources: live('emu') ? l.sharedEmuSources : [],
    };
  },
};

function walk(dir: string): string[] {
  if (!existsSync(dir)) return [];
  const out: string[] = [];
  for (const name of readdirSync(dir).sort()) {
    const abs = join(dir, name);
    if (statSync(abs).isDirectory()) out.push(...walk(abs));
    else out.push(abs);
  }
  return out;
}

function renderTemplate(env: nunjucks.Environment, root: string, abs: string, context: object): string {
  const name = relative(root, abs).split('\\').join('/');
  try {
    return env.render(name, context);
  } catch (e) {
    throw new Error(`rendering templates/${name}: ${(e as Error).message}`);
  }
}

/** The shared base: every *.njk of templates/<dir> rendered, everything else copied (descriptors excepted). */
function renderTarget(env: nunjucks.Environment, root: string, t: TargetRenderer, context: object): RenderedFile[] {
  const base = join(root, t.dir);
  return walk(base)
    .filter((abs) => !abs.endsWith('.ops.json'))
    .map((abs) => {
      const rel = relative(base, abs).split('\\').join('/');
      const isTemplate = rel.endsWith('.njk');
      const name = isTemplate ? rel.slice(0, -4) : rel;
      return {
        path: t.outPath ? t.outPath(name) : `src/${t.dir}/${name}`,
        content: isTemplate ? renderTemplate(env, root, abs, context) : readFileSync(abs, 'utf8'),
        verbatim: !isTemplate,
      };
    });
}

/** C identifier for the addon target: qalora_<spec name>. */
export function targetName(plan: KernelPlan): string {
  return `qalora_${plan.spec.name.replace(/[^A-Za-z0-9_]/g, '_')}`;
}

export interface RenderResult {
  files: RenderedFile[];
  ops: OpDescriptor[];
  /** Backends whose sources exist and that have specializations (cuda still needs nvcc at build time). */
  backends: Backend[];
}

export function renderSources(plan: KernelPlan, version: string, opts: RenderOptions = {}): RenderResult {
  const root = resolve(opts.templateRoot ?? defaultTemplateRoot);
  const env = environment(root);
  const render = (t: TargetRenderer, layout: SourceLayout) =>
    t.enabled(plan) ? renderTarget(env, root, t, { plan, version, ...t.context(plan, layout) }) : [];
  const none: SourceLayout = { files: [], cpuSources: [], sharedCpuSources: [], cudaSources: [], emuSources: [], sharedEmuSources: [], backends: [], ops: [] };
  const layout = sourceLayout(plan, sourceTargets.flatMap((t) => render(t, none)), loadOpDescriptors(root));
  if (!existsSync(join(root, 'cmake', 'CMakeLists.txt.njk'))) throw new Error(`missing template ${join(root, 'cmake', 'CMakeLists.txt.njk')}`);
  const files = [...layout.files, ...render(addonTarget, layout), ...render(cmakeTarget, layout)];
  // What compiler/build.ts copies to build the shared libraries once per content: every verbatim source file
  // (headers included), with qalora.cmake and shared/CMakeLists.txt.
  files.push({ path: 'shared/inputs.json', content: JSON.stringify({ src: files.filter((f) => f.verbatim && f.path.startsWith('src/')).map((f) => f.path.slice(4)) }, null, 1) + '\n' });
  // cmake-js reads this to know the addon is N-API only (so it downloads no Node headers); "module" lets
  // bindings.ts run as ESM.
  files.push({
    path: 'package.json',
    content: JSON.stringify({ name: targetName(plan), private: true, type: 'module', binary: { napi_versions: [8] } }, null, 2) + '\n',
  });
  return { files, ops: layout.ops, backends: layout.backends.map((b) => b.name) };
}

/** Classifies the rendered sources and decides which backends the addon gets. */
function sourceLayout(plan: KernelPlan, files: RenderedFile[], ops: OpDescriptor[]): SourceLayout {
  const under = (dir: string, ext: string) => files.filter((f) => f.path.startsWith(`src/${dir}/`) && f.path.endsWith(ext));
  const paths = (fs: RenderedFile[]) => fs.map((f) => f.path.slice(4));
  const cpuFiles = [...under('cpu', '.cpp'), ...under('core', '.cpp')];
  const cudaFiles = hasCuda(plan) ? under('cuda', '.cu') : [];
  const cudaSources = paths(cudaFiles);
  const haveCpu = under('cpu', '.cpp').length > 0 && withCpu(plan).length > 0;
  // A GPU backend without layers still has the core ops and the device memory (a float model on the GPU).
  const haveCuda = cudaSources.length > 0;
  const haveEmu = haveCuda && files.some((f) => f.path === 'src/emu/cuda_emu.h'); // qalora.cmake -includes it
  // The emulator compiles each .cu as C++: a one-line wrapper per kernels file, built with -include cuda_emu.h;
  // a wrapper is as spec-independent as the file it includes.
  const wrappers: RenderedFile[] = haveEmu
    ? cudaFiles.map((f) => ({
        path: `src/addon/emu_${f.path.slice('src/cuda/'.length).replace(/[/.]/g, '_')}.cpp`,
        content: `// Generated: ${f.path.slice(4)} built by g++ under the CUDA emulator.\n#include "../${f.path.slice(4)}"\n`,
        verbatim: f.verbatim,
      }))
    : [];
  const emuFiles = [...under('emu', '.cpp'), ...wrappers];
  const backends: SourceLayout['backends'] = [];
  if (haveCpu) backends.push({ name: 'cpu', specializations: withCpu(plan) });
  if (haveCuda) backends.push({ name: 'cuda', specializations: withCuda(plan) });
  if (haveEmu) backends.push({ name: 'emu', specializations: withCuda(plan) });
  return {
    files: [...files, ...wrappers],
    cpuSources: paths(cpuFiles.filter((f) => !f.verbatim)),
    sharedCpuSources: paths(cpuFiles.filter((f) => f.verbatim)),
    cudaSources,
    emuSources: paths(emuFiles.filter((f) => !f.verbatim)),
    sharedEmuSources: paths(emuFiles.filter((f) => f.verbatim)),
    backends,
    ops,
  };
}
