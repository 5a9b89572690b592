// `qalora inspect`: the emitted CUDA region of a specialization and a per-kernel table whose numbers come from
// two independent readers — ptxas -v's text and the cubin's ELF (.nv.info EIATTR records, .text sections) —
// which must agree with each other.
import { describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ptxEntries, sassFunctions, sassTool } from '../compiler/disasm.ts';
import { demangle, gemmSmemBytes, NVCC, parsePtxas, readCubin, shortKernelName } from '../compiler/inspect.ts';
import { planSpec } from '../compiler/plan.ts';
import { parseSpec } from '../dsl/index.ts';
import { repoRoot } from './fixtures.ts';

const SPEC = `spec inspect_probe {
  qalora { bits 3  group 64  rank 8  alpha 16  dtype bf16 }
  layer proj { in 256  out 64 }
  target cpu
  target cuda { archs sm_80, sm_90 }
}
`;

function qalora(args: string[]) {
  return spawnSync(process.execPath, [join(repoRoot, 'bin', 'qalora.mjs'), ...args], { cwd: repoRoot, encoding: 'utf8' });
}

describe('parsePtxas', () => {
  it('reads registers, barriers, spills, stack and static shared memory per function and arch', () => {
    const log = [
      "ptxas info    : Compiling entry function '_Z1fv' for 'sm_80'",
      'ptxas info    : Function properties for _Z1fv',
      '    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads',
      'ptxas info    : Used 255 registers, used 1 barriers, 24 bytes cumulative stack size, 4096 bytes smem, 380 bytes cmem[0]',
      "ptxas info    : Compiling entry function '_Z1gv' for 'sm_90'",
      'ptxas info    : Used 32 registers, used 0 barriers',
    ].join('\n');
    expect(parsePtxas(log)).toEqual([
      { mangled: '_Z1fv', arch: 'sm_80', registers: 255, barriers: 1, spillStores: 8, spillLoads: 12, stackFrame: 24, staticSmem: 4096 },
      { mangled: '_Z1gv', arch: 'sm_90', registers: 32, barriers: 0, spillStores: 0, spillLoads: 0, stackFrame: 0, staticSmem: 0 },
    ]);
  });
});

describe('PTX and SASS listings are split per kernel', () => {
  it('ptxEntries: each .entry to its closing brace', () => {
    const ptx = '.version 9.0\n.target sm_90\n.visible .entry _Z1fv(\n)\n{\n\tret;\n}\n.visible .entry _Z1gv(\n.param .u64 p\n)\n{\n\tret;\n}\n';
    expect(ptxEntries(ptx)).toEqual([
      { mangled: '_Z1fv', text: '.visible .entry _Z1fv(\n)\n{\n\tret;\n}' },
      { mangled: '_Z1gv', text: '.visible .entry _Z1gv(\n.param .u64 p\n)\n{\n\tret;\n}' },
    ]);
  });

  it('sassFunctions: cuobjdump and nvdisasm layouts', () => {
    const cuobjdump = '\tcode for sm_90\n\t\tFunction : _Z1fv\n\t.headerflags @"EF"\n        /*0000*/ LDC R1, c[0x0][0x28] ;\n\t\tFunction : _Z1gv\n        /*0000*/ EXIT ;\n';
    expect(sassFunctions(cuobjdump).map((f) => [f.mangled, f.text.split('\n').length])).toEqual([['_Z1fv', 3], ['_Z1gv', 2]]);
    const nvdisasm = '\t.headerflags @"EF"\n\t.section\t.text._Z1fv,"ax",@progbits\n_Z1fv:\n        /*0000*/ EXIT ;\n';
    expect(sassFunctions(nvdisasm).map((f) => f.mangled)).toEqual(['_Z1fv']);
  });
});

describe('qalora inspect', () => {
  const dir = mkdtempSync(join(tmpdir(), 'qalora-inspect-test-'));
  const specFile = join(dir, 'probe.qal');
  writeFileSync(specFile, SPEC);

  it('shows the specialization source and a table that agrees with the cubin', () => {
    const keep = join(dir, 'keep');
    const r = qalora(['inspect', specFile, '--kernel', 'proj', '--arch', 'sm_90', '--keep', keep]);
    expect(r.status, r.stderr).toBe(0);
    // The rendered region with its specialization constants.
    expect(r.stdout).toContain('// ==== specialization b3_g64_bf16_mean ====');
    expect(r.stdout).toContain('static constexpr int bits = 3;');
    expect(r.stdout).toContain('static constexpr int group = 64;');
    expect(r.stdout).toContain('using act = __nv_bfloat16;');
    expect(r.stdout).toMatch(/gemm_kernel<y>\s+sm_90\s+128\s+\d+\s+0\/0/);

    // ptxas's text and the ELF agree kernel by kernel; the table prints exactly those numbers.
    const fromPtxas = parsePtxas(readFileSync(join(keep, 'nvcc-sm_90.log'), 'utf8'));
    const fromElf = new Map(readCubin(readFileSync(join(keep, 'src', 'cuda', 'kernels.sm_90.cubin'))).map((k) => [k.mangled, k]));
    expect(fromPtxas.length).toBe(14);
    expect(fromElf.size).toBe(fromPtxas.length);
    const names = demangle(fromPtxas.map((k) => k.mangled));
    for (const k of fromPtxas) {
      const elf = fromElf.get(k.mangled);
      expect(elf, k.mangled).toBeDefined();
      expect(elf!.registers, k.mangled).toBe(k.registers);
      expect(elf!.frameSize, k.mangled).toBe(k.stackFrame);
      expect(elf!.sassBytes % 16, k.mangled).toBe(0); // whole 128-bit instructions
      expect(elf!.sassBytes).toBeGreaterThan(0);
      const short = shortKernelName(names.get(k.mangled)!);
      const row = r.stdout.split('\n').find((l) => l.startsWith(short + ' '));
      expect(row, short).toBeDefined();
      const cols = row!.trim().split(/\s+/);
      expect(Number(cols[3]), `${short} regs`).toBe(k.registers);
      expect(Number(cols.at(-1)), `${short} SASS`).toBe(elf!.sassBytes);
    }
  });

  it("reports the dynamic shared memory the kernels are launched with (checked against the C++ Tile by g++)", () => {
    // The kept sources of the first test: kernels.cu compiled as C++ under the emulator header, with
    // static_asserts holding the numbers inspect prints.
    const keep = join(dir, 'keep');
    const spec = parseSpec(SPEC, specFile).spec!;
    const s = planSpec(spec).specializations[0];
    const cfg = `qalora::emu::${s.id}::Config`;
    const check = join(keep, 'src', 'smem_check.cpp');
    writeFileSync(
      check,
      `#include "emu/cuda_emu.h"\n#include "cuda/kernels.cu"\n` +
        `static_assert(qalora::emu::kern::Tile<${cfg}, false>::smem_bytes == ${gemmSmemBytes(s, false)}, "forward");\n` +
        `static_assert(qalora::emu::kern::Tile<${cfg}, true>::smem_bytes == ${gemmSmemBytes(s, true)}, "backward");\n`,
    );
    const cuda = process.env.CUDA_HOME ?? '/usr/local/cuda';
    const src = join(keep, 'src');
    const r = spawnSync('g++', ['-std=c++17', '-fsyntax-only', '-DQALORA_EMU', `-I${src}`, `-I${join(src, 'common')}`, `-I${join(cuda, 'include')}`, check], { encoding: 'utf8' });
    expect(r.status, r.stderr.slice(0, 3000)).toBe(0);
  });

  it('llama2-7b b4_g32_fp16_mean on sm_90: the kernel bodies it instantiates, their PTX, and SASS where a disassembler exists', () => {
    const sass = sassTool(NVCC) !== null;
    const args = ['inspect', join(repoRoot, 'specs', 'llama2-7b.qal'), '--kernel', 'b4_g32_fp16_mean', '--arch', 'sm_90', '--ptx', ...(sass ? ['--sass'] : [])];
    const r = qalora(args);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('static constexpr int bits = 4;');
    // The templates behind the Config: the tensor-core GEMM and what it calls, the GEMV with its vector loads.
    expect(r.stdout).toMatch(/\/\/ ---- gemm_kernel \(src\/cuda\/gemm\.cuh:\d+\), instantiated as gemm_kernel<y>, gemm_kernel<dx> ----\n/);
    expect(r.stdout).toMatch(/\/\/ ---- run_tensor_cores \(src\/cuda\/gemm\.cuh:\d+\), called by gemm_kernel ----\n/);
    expect(r.stdout).toMatch(/\/\/ ---- load8 \(src\/cuda\/gemv\.cuh:\d+\), called by gemv_kernel ----\n/);
    expect(r.stdout).toContain('__global__ void QL_LAUNCH_BOUNDS(C::gemm_warps * 32');
    // PTX per kernel of this specialization only, with the tensor-core instructions the arch check relies on.
    const ptx = r.stdout.split('// ==== PTX sm_90: ').slice(1);
    expect(ptx.length).toBeGreaterThanOrEqual(10);
    for (const k of ptx) {
      expect(k).toContain('.entry');
      expect(k).toContain('16b4_g32_fp16_mean');
    }
    const gemm = ptx.find((k) => k.startsWith('gemm_kernel<y>'))!;
    expect(gemm).toContain('mma.sync.aligned.m16n8k16');
    expect(gemm).toContain('cp.async');
    if (sass) {
      const listing = r.stdout.split('// ==== SASS sm_90: ').slice(1);
      expect(listing.length).toBe(ptx.length);
      expect(listing.find((k) => k.startsWith('gemm_kernel<y>'))).toMatch(/HMMA/);
      expect(listing.join('')).toMatch(/LDG/);
    }
  }, 600_000);

  it.runIf(sassTool(NVCC) === null)('--sass without cuobjdump or nvdisasm says so before compiling', () => {
    const r = qalora(['inspect', specFile, '--sass']);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('--sass needs cuobjdump or nvdisasm');
  });

  it('names an unknown kernel and lists the known ones', () => {
    const r = qalora(['inspect', specFile, '--kernel', 'nope']);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('--kernel nope');
    expect(r.stderr).toContain('b3_g64_bf16_mean');
    expect(r.stderr).toContain('proj');
  });

  it('rejects a malformed arch', () => {
    const r = qalora(['inspect', specFile, '--arch', 'ampere']);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('--arch ampere');
  });

  it('--cpu shows the CPU instantiation of the specialization instead', () => {
    const r = qalora(['inspect', specFile, '--kernel', 'b3_g64_bf16_mean', '--cpu']);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/QL_CPU_DEFINE_SPEC\(b3_g64_bf16_mean, 3, 64, bf16, mean/);
    expect(r.stdout).not.toContain('__global__');
    rmSync(dir, { recursive: true, force: true });
  });
});
