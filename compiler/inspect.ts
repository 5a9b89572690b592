// `qalora inspect`: what the compiler emitted for a specialization and what ptxas made of it. Renders the spec's
// CUDA sources (the same renderer as `compile`), compiles kernels.cu to a cubin per arch with nvcc, and reports
// per kernel: registers, spills, stack, shared memory (static + the dynamic bytes it is launched with) and the
// static SASS size, read from ptxas -v and from the cubin's ELF itself (.nv.info EIATTR records, .text.<fn>);
// before the table, the kernel templates the specialization instantiates (kernel-bodies.ts), after it, on
// request, their PTX and SASS per arch (disasm.ts).
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import type { ResolvedSpec } from '../dsl/resolved.ts';
import { disassemble, ptxEntries, type Listing } from './disasm.ts';
import type { KernelPlan, Specialization } from './ir.ts';
import { kernelBodies } from './kernel-bodies.ts';
import { compilerVersion, gemmSmemBytes as planGemmSmemBytes, planSpec } from './plan.ts';
import { renderSources } from './render.ts';
import { formatTable } from './table.ts';
import { QaloraError } from '../runtime/errors.ts';

export const NVCC = process.env.NVCC ?? '/usr/local/bin/nvcc';

// ---- Rendering -------------------------------------------------------------------------------------------

/** Renders the spec's sources into `dir` (src/...) and returns the path of src/cuda/kernels.cu. */
export function renderCuda(plan: KernelPlan, dir: string): string {
  const { files } = renderSources(plan, compilerVersion);
  for (const f of files.filter((f) => f.path.startsWith('src/'))) {
    mkdirSync(dirname(join(dir, f.path)), { recursive: true });
    writeFileSync(join(dir, f.path), f.content);
  }
  return join(dir, 'src', 'cuda', 'kernels.cu');
}

/** The region of the rendered source that belongs to one specialization (its constants and entry points). */
export function specializationSource(kernelsCu: string, id: string): string {
  const start = kernelsCu.indexOf(`// ==== specialization ${id} ====`);
  const endMark = `// ==== end ${id} ====`;
  const end = kernelsCu.indexOf(endMark);
  if (start < 0 || end < 0) throw new QaloraError(`the rendered kernels.cu has no region for specialization ${id}`);
  return kernelsCu.slice(start, end + endMark.length);
}

// ---- nvcc and ptxas -v -----------------------------------------------------------------------------------

export interface NvccResult {
  ok: boolean;
  /** stderr+stdout of nvcc (ptxas -v lines included). */
  log: string;
  cubin?: string;
  ms: number;
}

export function nvccAvailable(): boolean {
  return spawnSync(NVCC, ['--version'], { encoding: 'utf8' }).status === 0;
}

/**
 * Compiles one kernels.cu for `archs`. One arch: a cubin (readable with readCubin); several: one object with all of
 * them (one front-end pass, ptxas per arch). Spills and local memory are errors unless `allowSpills`.
 */
export function nvccCompile(kernelsCu: string, archs: string[], opts: { allowSpills?: boolean; out?: string; keepDir?: string } = {}): Promise<NvccResult> {
  const src = dirname(kernelsCu);
  const single = archs.length === 1;
  const out = opts.out ?? kernelsCu.replace(/\.cu$/, single ? `.${archs[0]}.cubin` : '.o');
  const ptxas = ['-v', '-warn-spills', '-warn-lmem-usage', ...(opts.allowSpills ? [] : ['-Werror'])].join(',');
  // Several archs: one PTX for the lowest (one front-end/cicc pass), SASS for each arch by ptxas.
  const lowest = archs.map((a) => a.replace(/^sm_/, '')).sort((a, b) => parseInt(a) - parseInt(b))[0];
  const archArgs = single
    ? [`-arch=${archs[0]}`, '-cubin']
    : ['-gencode', `arch=compute_${lowest.replace(/a$/, '')},code=[${archs.join(',')}]`, '-c'];
  // keepDir: the intermediate files (the PTX among them) of this very compilation, not a second front-end pass.
  const keep = opts.keepDir ? (mkdirSync(opts.keepDir, { recursive: true }), ['-keep', '-keep-dir', opts.keepDir]) : [];
  const args = ['-std=c++17', '-O3', `-I${join(src, '..')}`, `-I${join(src, '..', 'common')}`, ...archArgs, `-Xptxas=${ptxas}`, ...keep, kernelsCu, '-o', out];
  const t0 = performance.now();
  return new Promise((resolve) => {
    const p = spawn(NVCC, args, { cwd: src });
    let log = '';
    p.stdout.on('data', (d) => (log += d));
    p.stderr.on('data', (d) => (log += d));
    p.on('error', (e) => resolve({ ok: false, log: `${log}\n${NVCC}: ${e.message}`, ms: performance.now() - t0 }));
    p.on('close', (code) => resolve({ ok: code === 0, log, cubin: code === 0 && single ? out : undefined, ms: performance.now() - t0 }));
  });
}

export interface PtxasKernel {
  mangled: string;
  arch: string;
  registers: number;
  barriers: number;
  spillStores: number;
  spillLoads: number;
  stackFrame: number;
  staticSmem: number;
}

/** Parses ptxas -v output: one entry per (function, arch). */
export function parsePtxas(log: string): PtxasKernel[] {
  const out: PtxasKernel[] = [];
  let cur: PtxasKernel | null = null;
  for (const line of log.split('\n')) {
    const fn = /Compiling entry function '([^']+)' for '(sm_\w+)'/.exec(line);
    if (fn) {
      cur = { mangled: fn[1], arch: fn[2], registers: 0, barriers: 0, spillStores: 0, spillLoads: 0, stackFrame: 0, staticSmem: 0 };
      out.push(cur);
      continue;
    }
    if (!cur) continue;
    const frame = /(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads/.exec(line);
    if (frame) [cur.stackFrame, cur.spillStores, cur.spillLoads] = frame.slice(1).map(Number);
    const used = /Used (\d+) registers(?:, used (\d+) barriers)?/.exec(line);
    if (used) {
      cur.registers = Number(used[1]);
      cur.barriers = Number(used[2] ?? 0);
      const smem = /(\d+) bytes smem/.exec(line);
      cur.staticSmem = smem ? Number(smem[1]) : 0;
    }
  }
  return out;
}

// ---- The cubin's ELF -------------------------------------------------------------------------------------

export interface CubinKernel {
  mangled: string;
  /** EIATTR_REGCOUNT (0x2f). */
  registers: number;
  /** EIATTR_FRAME_SIZE (0x11): bytes of local memory per thread. */
  frameSize: number;
  /** Size of .text.<kernel>: static SASS bytes. */
  sassBytes: number;
  /** Size of .nv.shared.<kernel>: static shared memory. */
  staticSmem: number;
}

const EIATTR_FRAME_SIZE = 0x11;
const EIATTR_REGCOUNT = 0x2f;
const EIFMT_NVAL = 0x01, EIFMT_BVAL = 0x02, EIFMT_HVAL = 0x03, EIFMT_SVAL = 0x04;

/** Reads the per-kernel attributes of a cubin (ELF64, little-endian) without cuobjdump. */
export function readCubin(buf: Buffer): CubinKernel[] {
  if (buf.readUInt32BE(0) !== 0x7f454c46 || buf[4] !== 2 || buf[5] !== 1) throw new Error('not an ELF64 little-endian cubin');
  const shoff = Number(buf.readBigUInt64LE(0x28));
  const shentsize = buf.readUInt16LE(0x3a), shnum = buf.readUInt16LE(0x3c), shstrndx = buf.readUInt16LE(0x3e);
  const sections = Array.from({ length: shnum }, (_, i) => {
    const o = shoff + i * shentsize;
    return {
      nameOff: buf.readUInt32LE(o),
      type: buf.readUInt32LE(o + 4),
      offset: Number(buf.readBigUInt64LE(o + 24)),
      size: Number(buf.readBigUInt64LE(o + 32)),
      name: '',
    };
  });
  const cstr = (off: number) => buf.toString('latin1', off, buf.indexOf(0, off));
  for (const s of sections) s.name = cstr(sections[shstrndx].offset + s.nameOff);

  const symtab = sections.find((s) => s.type === 2);
  const strtab = symtab ? sections.find((s) => s.name === '.strtab') : undefined;
  const symName = (index: number) =>
    symtab && strtab ? cstr(strtab.offset + buf.readUInt32LE(symtab.offset + index * 24)) : `sym#${index}`;

  const kernels = new Map<string, CubinKernel>();
  const kernel = (name: string) => {
    let k = kernels.get(name);
    if (!k) kernels.set(name, (k = { mangled: name, registers: 0, frameSize: 0, sassBytes: 0, staticSmem: 0 }));
    return k;
  };
  for (const s of sections) {
    if (s.name.startsWith('.text.')) kernel(s.name.slice(6)).sassBytes = s.size;
    if (s.name.startsWith('.nv.shared.') && !s.name.startsWith('.nv.shared.reserved')) kernel(s.name.slice(11)).staticSmem = s.size;
  }
  for (const s of sections.filter((s) => s.name === '.nv.info')) {
    let p = s.offset;
    while (p + 2 <= s.offset + s.size) {
      const fmt = buf[p], attr = buf[p + 1];
      p += 2;
      if (fmt === EIFMT_NVAL) continue;
      if (fmt === EIFMT_BVAL) { p += 1; continue; }
      if (fmt === EIFMT_HVAL) { p += 2; continue; }
      if (fmt !== EIFMT_SVAL) break;  // unknown format: the rest cannot be framed
      const size = buf.readUInt16LE(p);
      p += 2;
      if ((attr === EIATTR_REGCOUNT || attr === EIATTR_FRAME_SIZE) && size >= 8) {
        const k = kernel(symName(buf.readUInt32LE(p)));
        const value = buf.readUInt32LE(p + 4);
        if (attr === EIATTR_REGCOUNT) k.registers = value;
        else k.frameSize = value;
      }
      p += size;
    }
  }
  return [...kernels.values()].filter((k) => k.sassBytes > 0);
}

// ---- Kernel names ----------------------------------------------------------------------------------------

/** c++filt each mangled name (identity where c++filt is missing). */
export function demangle(names: string[]): Map<string, string> {
  const r = spawnSync('c++filt', [], { input: names.join('\n'), encoding: 'utf8' });
  const lines = r.status === 0 ? r.stdout.split('\n') : names;
  return new Map(names.map((n, i) => [n, lines[i] || n]));
}

/** 'qalora::cuda::kern::gemm_kernel<qalora::cuda::b4_g32_fp16_mean::Config, true>(…)' → 'gemm_kernel<dx>'. */
export function shortKernelName(demangled: string): string {
  const m = /kern::(\w+)<[^,>]*(?:, ([^>]+))?>/.exec(demangled);
  if (!m) return demangled;
  if (m[1] === 'gemm_kernel') return m[2] === 'true' ? 'gemm_kernel<dx>' : 'gemm_kernel<y>';
  if (m[1] === 'gemv_kernel') return `gemv_kernel<M≤${m[2]}>`;
  return m[1];
}

// ---- Dynamic shared memory (mirrors kern::Tile in templates/cuda/gemm.cuh) -------------------------------

/** Bytes the tiled engine is launched with in one orientation (the plan's formula, compiler/plan.ts). */
export function gemmSmemBytes(s: Specialization, trans: boolean): number {
  return planGemmSmemBytes(s.bits, s.dtype, s.cuda!.gemm, trans);
}

// ---- The report ------------------------------------------------------------------------------------------

export interface KernelReport {
  specialization: string;
  kernel: string;
  mangled: string;
  arch: string;
  threads: number;
  registers: number;
  spillStores: number;
  spillLoads: number;
  frameSize: number;
  staticSmem: number;
  dynamicSmem: number;
  sassBytes: number;
}

function launchOf(s: Specialization, kernel: string): { threads: number; dynamicSmem: number } {
  const c = s.cuda!;
  if (kernel.startsWith('gemm_kernel')) return { threads: c.gemm.warps * 32, dynamicSmem: gemmSmemBytes(s, kernel.endsWith('<dx>')) };
  if (kernel.startsWith('gemv_kernel')) return { threads: c.gemv.threads, dynamicSmem: 0 };
  return { threads: 256, dynamicSmem: 0 };
}

/** Joins ptxas's view and the cubin's view of each kernel of the given specializations. */
export function kernelReports(plan: KernelPlan, arch: string, ptxasLog: string, cubin: Buffer | null): KernelReport[] {
  const fromPtxas = parsePtxas(ptxasLog).filter((k) => k.arch === arch);
  const fromCubin = new Map((cubin ? readCubin(cubin) : []).map((k) => [k.mangled, k]));
  const names = demangle(fromPtxas.map((k) => k.mangled));
  const reports: KernelReport[] = [];
  for (const k of fromPtxas) {
    const s = plan.specializations.find((s) => k.mangled.includes(`${s.id.length}${s.id}`));
    if (!s || !s.cuda) continue;
    const kernel = shortKernelName(names.get(k.mangled)!);
    const elf = fromCubin.get(k.mangled);
    reports.push({
      specialization: s.id,
      kernel,
      mangled: k.mangled,
      arch,
      ...launchOf(s, kernel),
      registers: elf?.registers || k.registers,
      spillStores: k.spillStores,
      spillLoads: k.spillLoads,
      frameSize: elf?.frameSize ?? k.stackFrame,
      staticSmem: elf?.staticSmem ?? k.staticSmem,
      sassBytes: elf?.sassBytes ?? 0,
    });
  }
  const order = ['quantize_stats_kernel', 'pack_kernel', 'dequantize_kernel', 'pool_kernel', 'gemv', 'gemm_kernel<y>', 'gemm_kernel<dx>', 'lora', 'merge'];
  const rank = (n: string) => order.findIndex((o) => n.startsWith(o));
  return reports.sort((a, b) => a.specialization.localeCompare(b.specialization) || rank(a.kernel) - rank(b.kernel) || a.kernel.localeCompare(b.kernel, 'en', { numeric: true }));
}

export function reportTable(reports: KernelReport[]): string {
  return formatTable(
    ['kernel', 'arch', 'threads', 'regs', 'spill st/ld', 'frame B', 'smem static', 'smem dyn', 'SASS B'],
    reports.map((r) => [r.kernel, r.arch, r.threads, r.registers, `${r.spillStores}/${r.spillLoads}`, r.frameSize, r.staticSmem, r.dynamicSmem, r.sassBytes]),
  ) +
    '\nregs, frame B (local memory per thread): the cubin\'s EIATTR_REGCOUNT / EIATTR_FRAME_SIZE; spills: ptxas -v;' +
    '\nsmem static: the .nv.shared.<kernel> section (sm_90 reserves 1 KB per block there); smem dyn: what the launch' +
    '\nrequests; SASS B: the .text.<kernel> section; threads: the block size the host code launches with.';
}

export interface InspectOptions {
  /** A specialization id (b4_g32_fp16_mean) or a layer name (q, down, …); default: every specialization. */
  kernel?: string;
  /** Archs to compile for; default: the spec's cuda archs. */
  archs?: string[];
  /** Show the CPU source instead of CUDA (no nvcc). */
  cpu?: boolean;
  /** Keep the rendered sources and cubins here instead of a temporary folder. */
  workDir?: string;
  /** Also print each kernel's PTX per arch. */
  ptx?: boolean;
  /** Also print each kernel's SASS per arch (needs cuobjdump or nvdisasm). */
  sass?: boolean;
}

export function selectSpecializations(plan: KernelPlan, name: string | undefined): Specialization[] {
  if (!name) return plan.specializations;
  const byId = plan.specializations.find((s) => s.id === name);
  const byLayer = plan.layers.find((l) => l.name === name);
  const s = byId ?? (byLayer && plan.specializations.find((s) => s.id === byLayer.specialization));
  if (!s) {
    const known = [...plan.specializations.map((s) => s.id), ...plan.layers.map((l) => l.name)].join(', ');
    throw new QaloraError(`--kernel ${name}: no such specialization or layer in spec '${plan.spec.name}' (known: ${known})`);
  }
  return [s];
}

export interface InspectResult {
  text: string;
  reports: KernelReport[];
}

export async function inspectSpec(spec: ResolvedSpec, opts: InspectOptions = {}): Promise<InspectResult> {
  const plan = planSpec(spec);
  const chosen = selectSpecializations(plan, opts.kernel);
  const work = opts.workDir ?? mkdtempSync(join(tmpdir(), 'qalora-inspect-'));
  try {
    if (opts.cpu) return { text: cpuSource(plan, chosen), reports: [] };
    if (!spec.targets.cuda) throw new QaloraError(`spec '${spec.name}' has no cuda target; use --cpu to see the CPU source`);
    const archs = opts.archs ?? spec.targets.cuda.archs;
    for (const a of archs) if (!/^sm_\d+a?$/.test(a)) throw new QaloraError(`--arch ${a}: expected an arch like sm_80 or sm_90`);
    const cu = renderCuda(plan, work);
    const source = readFileSync(cu, 'utf8');
    const keepDir = (arch: string) => join(work, `keep-${arch}`);
    const results = await Promise.all(archs.map((a) => nvccCompile(cu, [a], { allowSpills: true, keepDir: opts.ptx ? keepDir(a) : undefined })));
    const reports: KernelReport[] = [];
    const listings: { arch: string; ptx: Listing[]; sass: Listing[] }[] = [];
    results.forEach((r, i) => {
      const arch = archs[i];
      writeFileSync(join(work, `nvcc-${arch}.log`), r.log);
      if (!r.ok) throw new QaloraError(`nvcc failed for ${arch}:\n${r.log.split('\n').filter((l) => /error/i.test(l)).slice(0, 20).join('\n')}`);
      reports.push(...kernelReports(plan, arch, r.log, r.cubin ? readFileSync(r.cubin) : null));
      listings.push({
        arch,
        ptx: opts.ptx ? ptxEntries(readFileSync(join(keepDir(arch), 'kernels.ptx'), 'utf8')) : [],
        sass: opts.sass && r.cubin ? disassemble(NVCC, r.cubin) : [],
      });
    });
    const headers = readdirSync(dirname(cu))
      .filter((f) => f.endsWith('.cuh'))
      .sort()
      .map((f) => ({ path: `src/cuda/${f}`, content: readFileSync(join(dirname(cu), f), 'utf8') }));
    const parts = chosen.map((s) => {
      const mine = reports.filter((r) => r.specialization === s.id);
      const text = [specializationSource(source, s.id), kernelBodies(headers, instancesOf(mine)), reportTable(mine)];
      const names = new Map(mine.map((r) => [r.mangled, r.kernel]));
      for (const l of listings)
        for (const [what, list] of [['PTX', l.ptx], ['SASS', l.sass]] as const)
          for (const k of list.filter((k) => names.has(k.mangled)))
            text.push(`// ==== ${what} ${l.arch}: ${names.get(k.mangled)} (${k.mangled}) ====\n${k.text}`);
      return text.join('\n\n') + '\n';
    });
    return { text: parts.join('\n'), reports: reports.filter((r) => chosen.some((s) => s.id === r.specialization)) };
  } finally {
    if (!opts.workDir) rmSync(work, { recursive: true, force: true });
  }
}

/** Kernel template name → the instantiations the reports show (gemm_kernel → gemm_kernel<y>, gemm_kernel<dx>). */
function instancesOf(reports: KernelReport[]): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const r of reports) {
    const base = r.kernel.replace(/<.*$/, '');
    const list = out.get(base) ?? [];
    if (!list.includes(r.kernel)) list.push(r.kernel);
    out.set(base, list);
  }
  return out;
}

// CPU kernels are C++ templates instantiated by one macro line per specialization: show those lines (with
// their comment) from every rendered file, then the implementation headers they instantiate.
function cpuSource(plan: KernelPlan, chosen: Specialization[]): string {
  const { files } = renderSources(plan, compilerVersion);
  const cpu = files.filter((f) => f.path.startsWith('src/cpu/') && /\.(cpp|h)$/.test(f.path));
  const mentions = (l: string) => chosen.some((s) => l.includes(s.id));
  const instantiations = cpu
    .filter((f) => f.content.split('\n').some(mentions))
    .map((f) => {
      const lines = f.content.split('\n');
      const keep = lines.filter((l, i) => mentions(l) || (l.startsWith('//') && mentions(lines[i + 1] ?? '')));
      return `// ---- ${f.path} ----\n${keep.join('\n')}`;
    });
  if (instantiations.length === 0) throw new QaloraError(`no CPU source instantiates ${chosen.map((s) => s.id).join(', ')} (does the spec have a cpu target?)`);
  const impl = cpu.filter((f) => /\/(kernels_impl|layer|gemm|pack)\.h$/.test(f.path));
  return [...instantiations, ...impl.map((f) => `// ---- ${f.path} ----\n${f.content}`)].join('\n\n');
}
