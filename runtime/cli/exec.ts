// `qalora exec`: run one kernel on tensors from a safetensors file and write the results to another, so anyone
// can check a kernel against their own reference. The layer comes from a spec (`SPEC --layer NAME`) or from
// inline flags; an inline layer's specialization is compiled on demand into generated/cache/<key>/ and cached there.
import type { Command } from 'commander';
import { specializationId } from '../../compiler/plan.ts';
import { DEFAULT_CUDA_ARCHS } from '../../dsl/defaults.ts';
import { loadSpecOrFail } from '../../compiler/spec-file.ts';
import { formatTable } from '../../compiler/table.ts';
import { poolScale, type ActDType, type Bits, type Pool, type ResolvedSpec } from '../../dsl/resolved.ts';
import { QaloraError } from '../errors.ts';
import type { BackendName } from '../model/types.ts';
import { loadKernels, loadSpecializations, type KernelSet, type HostArgs, type LayerCallArgs } from '../native.ts';
import { readSafetensors, tensorOf, writeSafetensors, type SafeDType, type SafeTensor } from '../safetensors.ts';

export const OPS = ['quantize', 'forward', 'backward', 'merge'] as const;
export type ExecOp = (typeof OPS)[number];
const BACKENDS: BackendName[] = ['cpu', 'cuda', 'emu'];

export const TENSOR_HELP = `Tensors (layer W [out, in], group g, L = in/g, rank r, M rows; ACT = the layer's dtype: F32, F16 or BF16):
${formatTable(
  ['op', 'reads from --in', 'writes to --out'],
  [
    ['quantize', 'w [out,in] F32', 'qweight [out,ceil(in/32)*bits] I32 (packed blocked32), alpha [out,L] F32, beta [out,L] F32, w_hat [out,in] F32'],
    ['forward', 'x [M,in] ACT, qweight, alpha, beta, lora_a [r,L] F32, lora_b [out,r] F32', 'y [M,out] ACT'],
    ['backward', "forward's inputs, dy [M,out] ACT", 'dx [M,in] ACT, grad_lora_a [r,L] F32, grad_lora_b [out,r] F32'],
    ['merge', 'qweight, alpha, beta, lora_a, lora_b', 'qweight, alpha, beta (merged: beta + s*c*(B*A))'],
  ],
)}
qweight may be stored as I32 or U32. lora_a/lora_b may be omitted when the rank is 0.`;

/** The layer as exec needs it: the specialization key plus the runtime sizes and adapter settings. */
export interface ExecLayer {
  bits: Bits;
  group: number;
  dtype: ActDType;
  pool: Pool;
  inFeatures: number;
  outFeatures: number;
  rank: number;
  alpha: number;
  dropout: number;
}

const ACT_DTYPE: Record<ActDType, SafeDType> = { fp32: 'F32', fp16: 'F16', bf16: 'BF16' };

function fail(msg: string): never {
  throw new QaloraError(msg);
}

const shapeStr = (s: readonly (number | string)[]) => `[${s.join(', ')}]`;

/** Reads `name`, checking its dtype and shape (null entries in `shape` are free, e.g. M). */
function take(tensors: Map<string, SafeTensor>, file: string, name: string, dtypes: SafeDType[], shape: Array<number | null>, dims: string): SafeTensor {
  const t = tensors.get(name);
  const want = `${shapeStr(shape.map((d, i) => d ?? dims.split(',')[i].trim()))} ${dtypes.join(' or ')}`;
  if (!t) fail(`${file}: missing tensor '${name}' (expected ${want}; the file has ${[...tensors.keys()].join(', ') || 'no tensors'})`);
  const shapeOk = t.shape.length === shape.length && shape.every((d, i) => d === null || d === t.shape[i]);
  if (!dtypes.includes(t.dtype) || !shapeOk)
    fail(`${file}: tensor '${name}' must be ${want} (${dims}), got ${shapeStr(t.shape)} ${t.dtype}`);
  return t;
}

// Copies, so the typed arrays are aligned and owned (the file buffer's views may be neither).
const f32 = (t: SafeTensor) => new Float32Array(t.data.slice().buffer);
const u32 = (t: SafeTensor) => new Uint32Array(t.data.slice().buffer);
const u16 = (t: SafeTensor) => new Uint16Array(t.data.slice().buffer);

export interface ExecRequest {
  op: ExecOp;
  layer: ExecLayer;
  kernels: KernelSet;
  tensors: Map<string, SafeTensor>;
  file: string;
  seed: number;
  training: boolean;
}

/** Runs one op on the tensors; returns the output tensors. Pure apart from the kernel call. */
export function runOp(req: ExecRequest): Record<string, SafeTensor> {
  const { layer: l, kernels: k, tensors, file } = req;
  const L = l.inFeatures / l.group;
  const words = Math.ceil(l.inFeatures / 32) * l.bits;
  const act = ACT_DTYPE[l.dtype];
  const actArray = (t: SafeTensor) => (l.dtype === 'fp32' ? f32(t) : u16(t));
  const dims = `in ${l.inFeatures}, out ${l.outFeatures}, g ${l.group}, L ${L}, r ${l.rank}`;

  if (req.op === 'quantize') {
    const w = f32(take(tensors, file, 'w', ['F32'], [l.outFeatures, l.inFeatures], `out, in; ${dims}`));
    const q = new Uint32Array(l.outFeatures * words);
    const alpha = new Float32Array(l.outFeatures * L);
    const beta = new Float32Array(l.outFeatures * L);
    const wHat = new Float32Array(l.outFeatures * l.inFeatures);
    k.quantize(w, l.outFeatures, l.inFeatures, q, alpha, beta);
    k.dequantize(q, alpha, beta, l.outFeatures, l.inFeatures, wHat);
    return {
      qweight: tensorOf('I32', [l.outFeatures, words], q),
      alpha: tensorOf('F32', [l.outFeatures, L], alpha),
      beta: tensorOf('F32', [l.outFeatures, L], beta),
      w_hat: tensorOf('F32', [l.outFeatures, l.inFeatures], wHat),
    };
  }

  const qweightT = take(tensors, file, 'qweight', ['I32', 'U32'], [l.outFeatures, words], `out, ceil(in/32)*bits; ${dims}`);
  const alphaT = take(tensors, file, 'alpha', ['F32'], [l.outFeatures, L], `out, in/g; ${dims}`);
  const betaT = take(tensors, file, 'beta', ['F32'], [l.outFeatures, L], `out, in/g; ${dims}`);
  const hasAdapter = l.rank > 0 || tensors.has('lora_a');
  const loraA = hasAdapter ? f32(take(tensors, file, 'lora_a', ['F32'], [l.rank, L], `r, in/g; ${dims}`)) : undefined;
  const loraB = hasAdapter ? f32(take(tensors, file, 'lora_b', ['F32'], [l.outFeatures, l.rank], `out, r; ${dims}`)) : undefined;
  let m = 0;
  let x: Float32Array | Uint16Array | undefined;
  if (req.op !== 'merge') {
    const xT = take(tensors, file, 'x', [act], [null, l.inFeatures], `M, in; ${dims}`);
    m = xT.shape[0];
    if (m < 1) fail(`${file}: tensor 'x' has no rows`);
    x = actArray(xT);
  }
  const args: HostArgs<LayerCallArgs> = {
    qweight: u32(qweightT),
    alpha: f32(alphaT),
    beta: f32(betaT),
    loraA,
    loraB,
    m,
    in: l.inFeatures,
    out: l.outFeatures,
    rank: l.rank,
    scale: l.rank > 0 ? l.alpha / l.rank : 0,
    poolScale: poolScale(l.pool, l.group, l.inFeatures),
    dropout: l.dropout,
    training: req.training,
    seed: req.seed,
  };
  const newAct = (n: number) => (l.dtype === 'fp32' ? new Float32Array(n) : new Uint16Array(n));

  if (req.op === 'forward') {
    const y = newAct(m * l.outFeatures);
    k.forward(args, x!, y);
    return { y: tensorOf(act, [m, l.outFeatures], y) };
  }
  if (req.op === 'backward') {
    const dy = actArray(take(tensors, file, 'dy', [act], [m, l.outFeatures], `M, out; M ${m}, ${dims}`));
    const dx = newAct(m * l.inFeatures);
    const gradA = new Float32Array(l.rank * L);
    const gradB = new Float32Array(l.outFeatures * l.rank);
    k.backward(args, x!, dy, dx, gradA, gradB);
    return {
      dx: tensorOf(act, [m, l.inFeatures], dx),
      grad_lora_a: tensorOf('F32', [l.rank, L], gradA),
      grad_lora_b: tensorOf('F32', [l.outFeatures, l.rank], gradB),
    };
  }
  const betaOut = new Float32Array(l.outFeatures * L);
  k.merge(args, betaOut);
  return {
    qweight: tensorOf(qweightT.dtype, [l.outFeatures, words], args.qweight),
    alpha: tensorOf('F32', [l.outFeatures, L], args.alpha),
    beta: tensorOf('F32', [l.outFeatures, L], betaOut),
  };
}

interface ExecFlags {
  op?: string;
  backend: string;
  in?: string;
  out?: string;
  layer?: string;
  inFeatures?: string;
  outFeatures?: string;
  bits?: string;
  group?: string;
  rank?: string;
  alpha?: string;
  dtype?: string;
  pool?: string;
  dropout?: string;
  seed: string;
  training?: boolean;
}

function intFlag(v: string | undefined, flag: string, min: number): number {
  if (v === undefined) fail(`--${flag} is required for an inline layer (or give SPEC --layer NAME)`);
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) fail(`--${flag} must be an integer >= ${min}, got '${v}'`);
  return n;
}

function oneOf<T extends string>(v: string | undefined, flag: string, allowed: readonly T[]): T {
  if (v === undefined) fail(`--${flag} is required for an inline layer (one of ${allowed.join(', ')})`);
  if (!allowed.includes(v as T)) fail(`--${flag} must be one of ${allowed.join(', ')}, got '${v}'`);
  return v as T;
}

function inlineLayer(o: ExecFlags): ExecLayer {
  const inFeatures = intFlag(o.inFeatures, 'in-features', 1);
  const group = intFlag(o.group, 'group', 1);
  if (inFeatures % group !== 0) {
    const divisors = Array.from({ length: inFeatures }, (_, i) => i + 1).filter((d) => inFeatures % d === 0);
    fail(`--group ${group} does not divide --in-features ${inFeatures}; valid group sizes: ${divisors.join(', ')}`);
  }
  const dropout = o.dropout === undefined ? 0 : Number(o.dropout);
  if (!(dropout >= 0 && dropout < 1)) fail(`--dropout must be in [0, 1), got '${o.dropout}'`);
  const alpha = o.alpha === undefined ? NaN : Number(o.alpha);
  if (!Number.isFinite(alpha)) fail(`--alpha must be a number, got '${o.alpha}'`);
  return {
    inFeatures,
    outFeatures: intFlag(o.outFeatures, 'out-features', 1),
    bits: Number(oneOf(o.bits, 'bits', ['2', '3', '4', '8'])) as Bits,
    group,
    rank: intFlag(o.rank, 'rank', 0),
    alpha,
    dtype: oneOf(o.dtype, 'dtype', ['fp32', 'fp16', 'bf16'] as const),
    pool: oneOf(o.pool ?? 'mean', 'pool', ['mean', 'sum', 'peft'] as const),
    dropout,
  };
}

export function register(program: Command): void {
  program
    .command('exec')
    .description('run one kernel (quantize, forward, backward, merge) on tensors from a safetensors file')
    .argument('[spec]', 'spec file (.qal) holding the layer given by --layer')
    .option('--op <op>', `quantize | forward | backward | merge`)
    .option('--backend <backend>', 'cpu | cuda | emu', 'cpu')
    .option('--in <file>', 'input .safetensors')
    .option('--out <file>', 'output .safetensors')
    .option('--layer <name>', 'layer of SPEC')
    .option('--in-features <n>', 'inline layer: input features')
    .option('--out-features <n>', 'inline layer: output features')
    .option('--bits <b>', 'inline layer: 2 | 3 | 4 | 8')
    .option('--group <g>', 'inline layer: group size (divides in)')
    .option('--rank <r>', 'inline layer: LoRA rank (0: no adapter)')
    .option('--alpha <a>', 'inline layer: LoRA alpha (s = alpha/rank)')
    .option('--dtype <t>', 'inline layer: activation dtype fp32 | fp16 | bf16')
    .option('--pool <p>', 'inline layer: mean | sum | peft', undefined)
    .option('--dropout <p>', 'dropout probability (applied with --training)')
    .option('--seed <n>', 'dropout seed', '0')
    .option('--training', 'apply dropout')
    .addHelpText('after', `\n${TENSOR_HELP}`)
    .action(async (specPath: string | undefined, o: ExecFlags) => {
      const op = oneOf(o.op, 'op', OPS);
      const backend = oneOf(o.backend, 'backend', BACKENDS);
      if (!o.in) fail('--in IN.safetensors is required');
      if (!o.out) fail('--out OUT.safetensors is required');
      const seed = Number(o.seed);
      if (!Number.isSafeInteger(seed) || seed < 0) fail(`--seed must be a non-negative integer, got '${o.seed}'`);

      let spec: ResolvedSpec | undefined;
      let layer: ExecLayer;
      let layerName: string;
      if (specPath) {
        if (!o.layer) fail('SPEC needs --layer NAME');
        spec = loadSpecOrFail(specPath);
        const found = spec.layers.find((x) => x.name === o.layer);
        if (!found) fail(`${specPath}: no layer '${o.layer}' (layers: ${spec.layers.map((x) => x.name).join(', ')})`);
        layer = { ...found, dropout: o.dropout === undefined ? found.dropout : Number(o.dropout) };
        layerName = found.name;
        if (backend !== 'cpu' && !spec.targets.cuda) fail(`${specPath}: backend ${backend} needs a cuda target in the spec`);
        if (backend === 'cpu' && !spec.targets.cpu) fail(`${specPath}: backend cpu needs a cpu target in the spec`);
      } else {
        if (o.layer) fail('--layer needs a SPEC file');
        layer = inlineLayer(o);
        // The build holds the layer's specialization only (sizes are runtime arguments), so every inline layer
        // with the same bits/group/dtype/pool shares it, whatever its shape; its layer is named by the id.
        layerName = specializationId({ ...layer, scales: 'fp32' });
      }
      const input = readSafetensors(o.in);

      let announced = false;
      const build = {
        noCuda: backend !== 'cuda',
        onOutput: (line: string) => {
          if (!announced) process.stderr.write(`building kernels for ${spec?.name ?? layerName} (first use; cached afterwards)…\n`);
          announced = true;
          if (/^\[\d+\/\d+\]/.test(line)) process.stderr.write(`  ${line}\n`);
        },
      };
      const native = spec
        ? await loadKernels(spec, build)
        : await loadSpecializations([{ ...layer, scales: 'fp32' }], { cpu: true, cuda: backend === 'cpu' ? null : { archs: [...DEFAULT_CUDA_ARCHS] } }, build);
      if (backend === 'cuda' && !native.cudaStatus().startsWith('ok'))
        fail(`backend cuda is not usable here: ${native.cudaStatus()}`);
      if (!native.backends().includes(backend))
        fail(`backend ${backend} was not built (built: ${native.backends().join(', ') || 'none'}; cuda: ${native.cudaStatus()})`);
      const kernels = native.layer(layerName, backend);

      const outputs = runOp({ op, layer, kernels, tensors: input.tensors, file: o.in, seed, training: !!o.training });
      const specId = native.plan.layers.find((l) => l.name === layerName)!.specialization;
      writeSafetensors(o.out, outputs, { op, backend, kernel: specId, layer: layerName, qalora: native.compilerVersion });
      process.stderr.write(`${op} on ${backend}/${specId}: wrote ${Object.keys(outputs).join(', ')} to ${o.out}\n`);
    });
}
