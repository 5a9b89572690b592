// Stage 3: the typed TypeScript face of a generated addon (generated/<spec>/bindings.ts), emitted with ts-morph
// from the same plan and op descriptors the addon's C++ wrappers come from, so the types cannot drift from
// what the addon checks at run time.
import type { KernelPlan, Specialization } from './ir.ts';
import { EMU_COUNTERS } from './emu-counters.ts';
import { tsType, type OpDescriptor } from './ops.ts';

export interface BindingsInput {
  plan: KernelPlan;
  ops: OpDescriptor[];
  /** Backends whose sources were rendered. */
  backends: string[];
  /** File name of the built addon, relative to the bindings' folder. */
  addonFile: string;
}

const activationType = (s: Specialization) => (s.dtype === 'fp32' ? 'Float32Array' : 'Uint16Array');
/** α and β: Float32Array, or fp16 bits in a Uint16Array for `scales fp16`. */
const scaleType = (s: Specialization) => (s.scales === 'fp16' ? 'Uint16Array' : 'Float32Array');

const LAYER_ARGS_DOC =
  'One layer call; sizes are checked by the addon. loraA [rank, in/g] and loraB [out, rank] are required when rank > 0. S is the storage of alpha and beta.';

export async function emitBindings(input: BindingsInput): Promise<string> {
  const { Project, VariableDeclarationKind } = await import('ts-morph');
  const { plan, ops, backends } = input;
  const project = new Project({ useInMemoryFileSystem: true });
  const file = project.createSourceFile('bindings.ts', '');

  file.addImportDeclarations([
    { moduleSpecifier: 'node:os', namedImports: ['constants'] },
    { moduleSpecifier: 'node:path', namedImports: ['dirname', 'join'] },
    { moduleSpecifier: 'node:url', namedImports: ['fileURLToPath'] },
  ]);

  file.addTypeAlias({ name: 'Backend', isExported: true, type: `'cpu' | 'cuda' | 'emu'` });
  file.addInterface({
    name: 'LayerCallArgs',
    isExported: true,
    docs: [LAYER_ARGS_DOC],
    typeParameters: [{ name: 'S', constraint: 'Float32Array | Uint16Array', default: 'Float32Array' }],
    properties: [
      { name: 'qweight', type: 'Uint32Array' },
      { name: 'alpha', type: 'S' },
      { name: 'beta', type: 'S' },
      { name: 'loraA', type: 'Float32Array', hasQuestionToken: true },
      { name: 'loraB', type: 'Float32Array', hasQuestionToken: true },
      ...['m', 'in', 'out', 'rank', 'scale', 'poolScale', 'dropout'].map((name) => ({ name, type: 'number' })),
      { name: 'training', type: 'boolean' },
      { name: 'seed', type: 'number | bigint' },
    ],
  });
  file.addInterface({
    name: 'KernelSet',
    isExported: true,
    docs: ['The entry points of one specialization on one backend; A is the activation storage (fp16/bf16 as raw bits), S that of alpha and beta (fp16 as raw bits).'],
    typeParameters: [{ name: 'A', constraint: 'Float32Array | Uint16Array' }, { name: 'S', constraint: 'Float32Array | Uint16Array', default: 'Float32Array' }],
    properties: [
      { name: 'bits', type: 'number', isReadonly: true },
      { name: 'group', type: 'number', isReadonly: true },
      { name: 'scales', type: `'fp32' | 'fp16'`, isReadonly: true },
    ],
    methods: [
      { name: 'quantize', parameters: [p('w', 'Float32Array'), p('out', 'number'), p('inFeatures', 'number'), p('qweight', 'Uint32Array'), p('alpha', 'S'), p('beta', 'S')], returnType: 'void' },
      { name: 'dequantize', parameters: [p('qweight', 'Uint32Array'), p('alpha', 'S'), p('beta', 'S'), p('out', 'number'), p('inFeatures', 'number'), p('w', 'Float32Array')], returnType: 'void' },
      { name: 'forward', parameters: [p('args', 'LayerCallArgs<S>'), p('x', 'A'), p('y', 'A')], returnType: 'void' },
      { name: 'backward', parameters: [p('args', 'LayerCallArgs<S>'), p('x', 'A'), p('dy', 'A'), p('dx', 'A'), p('gradA', 'Float32Array'), p('gradB', 'Float32Array')], returnType: 'void' },
      { name: 'merge', parameters: [p('args', 'LayerCallArgs<S>'), p('betaOut', 'S')], returnType: 'void' },
    ],
  });

  const kernelSets = (name: string, specs: Specialization[]) =>
    file.addInterface({
      name,
      isExported: true,
      properties: specs.map((s) => ({ name: s.id, type: `KernelSet<${activationType(s)}, ${scaleType(s)}>`, docs: [`bits ${s.bits}, group ${s.group}, ${s.dtype}, pool ${s.pool}, ${s.scales} scales; layers: ${s.layers.join(', ')}`] })),
    });
  kernelSets('CpuKernels', plan.specializations.filter((s) => s.cpu));
  kernelSets('CudaKernels', plan.specializations.filter((s) => s.cuda));
  file.addInterface({
    name: 'Kernels',
    isExported: true,
    docs: ['Only the backends this addon was built with are present; see Addon.backends().'],
    properties: [
      { name: 'cpu', type: 'CpuKernels', hasQuestionToken: true },
      { name: 'cuda', type: 'CudaKernels', hasQuestionToken: true },
      { name: 'emu', type: 'CudaKernels', hasQuestionToken: true },
    ],
  });
  file.addInterface({
    name: 'CoreOps',
    isExported: true,
    methods: ops.map((op) => ({
      name: op.name,
      docs: [`${op.doc ? op.doc + ' ' : ''}(${op.cpp}, ${op.source})`],
      parameters: op.args.map((a) => p(a.name, tsType(a))),
      returnType: op.returns === 'f64' ? 'number' : 'void',
    })),
  });
  const gpuOps = ops.filter((op) => op.cuda);
  file.addTypeAlias({
    name: 'GpuCoreOps',
    isExported: true,
    docs: ['The core ops with a GPU twin (descriptors marked "cuda": true), same signatures.'],
    type: gpuOps.length ? `Pick<CoreOps, ${gpuOps.map((op) => `'${op.name}'`).join(' | ')}>` : 'Record<string, never>',
  });
  file.addInterface({
    name: 'EmuCounters',
    isExported: true,
    docs: ['What the emulated CUDA runtime did since the last emuResetCounters() (templates/emu/emu_counters.h).'],
    properties: EMU_COUNTERS.map((c) => ({ name: c.name, type: 'number', docs: [c.doc] })),
  });
  file.addInterface({
    name: 'Addon',
    isExported: true,
    properties: [
      { name: 'kernels', type: 'Kernels' },
      { name: 'core', type: 'CoreOps' },
      { name: 'coreOn', type: `{ cuda?: GpuCoreOps; emu?: GpuCoreOps }`, docs: ['GPU core ops per compiled backend (cuda, emu).'] },
      { name: 'specName', type: 'string' },
      { name: 'specHash', type: 'string' },
      { name: 'compilerVersion', type: 'string' },
      { name: 'emuCounters', type: '() => EmuCounters', hasQuestionToken: true, docs: ['The emulator\'s transfer, allocation, synchronization and launch counters; present when the emu backend is compiled.'] },
      { name: 'emuResetCounters', type: '() => void', hasQuestionToken: true },
    ],
    methods: [
      { name: 'backends', returnType: 'Backend[]' },
      { name: 'cudaStatus', docs: ['"ok: <device>, sm_XY" or "unavailable: <reason>"; never throws.'], returnType: 'string' },
    ],
  });

  const ids = (specs: Specialization[]) => `[${specs.map((s) => `'${s.id}'`).join(', ')}] as const`;
  file.addVariableStatements([
    { isExported: true, declarationKind: VariableDeclarationKind.Const, declarations: [{ name: 'specName', initializer: `'${plan.spec.name}'` }] },
    { isExported: true, declarationKind: VariableDeclarationKind.Const, declarations: [{ name: 'specHash', initializer: `'${plan.specHash}'` }] },
    { isExported: true, declarationKind: VariableDeclarationKind.Const, docs: ['Backends whose sources were rendered (cuda also needs nvcc at build time).'], declarations: [{ name: 'renderedBackends', initializer: `[${backends.map((b) => `'${b}'`).join(', ')}] as const` }] },
    { isExported: true, declarationKind: VariableDeclarationKind.Const, declarations: [{ name: 'specializationIds', initializer: ids(plan.specializations) }] },
    { isExported: true, declarationKind: VariableDeclarationKind.Const, declarations: [{ name: 'layerSpecializations', initializer: `{ ${plan.layers.map((l) => `${JSON.stringify(l.name)}: '${l.specialization}'`).join(', ')} } as const` }] },
    { isExported: true, declarationKind: VariableDeclarationKind.Const, declarations: [{ name: 'addonPath', initializer: `join(dirname(fileURLToPath(import.meta.url)), ${JSON.stringify(input.addonFile)})` }] },
  ]);
  file.addFunction({
    name: 'loadAddon',
    isExported: true,
    docs: ['Loads the built addon; RTLD_NOW so a missing kernel symbol fails here, not at the first call.'],
    parameters: [{ name: 'path', initializer: 'addonPath' }],
    returnType: 'Addon',
    statements: [
      'const module = { exports: {} as Addon };',
      'process.dlopen(module, path, constants.dlopen.RTLD_NOW);',
      'return module.exports;',
    ],
  });
  file.formatText({ indentSize: 2 });
  const banner = `// Generated by qalora ${plan.compilerVersion} for spec '${plan.spec.name}' (${plan.specHash.slice(0, 12)}). Do not edit.\n`;
  return banner + file.getFullText();
}

function p(name: string, type: string) {
  return { name, type };
}
