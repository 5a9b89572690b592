// GPTQ quantization of a float model into a spec, the way the paper quantized its bases: true-sequential.
// Block by block, and inside a block stage by stage (q,k,v → o → gate,up → down), each stage's input Hessian
// is collected by running the calibration sequences through the model as quantized so far, then the stage's
// projections are quantized (runtime/quantize/gptq.ts, native). Quantization error thus propagates into the
// statistics of what follows, as in GPTQ's reference implementation.
import type { ResolvedLayer } from '../../dsl/resolved.ts';
import { QaloraError } from '../errors.ts';
import { HessianAccumulator, gptqQuantizeLinear, type GptqNative } from '../quantize/gptq.ts';
import type { CreateOptions } from './llama.ts';
import type { NativeOps } from './native-ops.ts';
import { settingsOf } from './prepare.ts';
import { Runner } from './runner.ts';
import type { LlamaWeights, ProjectionName } from './types.ts';

/** Each stage's projections and the block buffer (written by Runner.forwardBlock) holding their input. */
const STAGES: Array<{ projections: ProjectionName[]; input: 'xn' | 'att' | 'xn2' | 'h'; width: 'dim' | 'hidden' }> = [
  { projections: ['q', 'k', 'v'], input: 'xn', width: 'dim' },
  { projections: ['o'], input: 'att', width: 'dim' },
  { projections: ['gate', 'up'], input: 'xn2', width: 'dim' },
  { projections: ['down'], input: 'h', width: 'hidden' },
];

export async function quantizeGptq(weights: LlamaWeights, layers: Map<ProjectionName, ResolvedLayer>, native: NativeOps, opts: CreateOptions): Promise<LlamaWeights> {
  const seqs = opts.calib?.sequences ?? [];
  if (seqs.length === 0) throw new QaloraError('GPTQ needs calibration data (--calib FILE): no calibration sequences were given');
  const c = weights.config;
  for (const [i, s] of seqs.entries()) {
    if (s.length < 1 || s.length > c.context) throw new QaloraError(`calibration sequence ${i} has ${s.length} tokens; it must have 1 to ${c.context}`);
    for (const id of s) if (id < 0 || id >= c.vocab) throw new QaloraError(`calibration sequence ${i} has token ${id}, outside the vocabulary [0, ${c.vocab})`);
  }
  const gptq = native.core as unknown as GptqNative;
  // prepareWeights resolved every projection: quant layers (checked against the spec) stay, float ones are ours.
  let current = weights;
  const total = c.layers * STAGES.reduce((n, st) => n + st.projections.filter((p) => layers.has(p)).length, 0);
  let done = 0;
  // Each sequence's residual stream entering the current block.
  const streams = seqs.map((s) => {
    const x = new Float32Array(s.length * c.dim);
    const ids = Int32Array.from(s);
    hostRunner(current, native).embed(ids, ids, x);
    return x;
  });
  const positions = seqs.map((s) => Int32Array.from(s, (_, t) => t));
  const runBlock = (runner: Runner, l: number, i: number, x: Float32Array) => {
    const t = seqs[i].length;
    runner.forwardBlock(l, x, t, positions[i], [], (_l, q, k, v, att, lse) => runner.core.attention_forward(q, k, v, att, lse, 1, t, t, c.heads, c.kvHeads, runner.headDim));
  };
  for (let l = 0; l < c.layers; l++) {
    for (const stage of STAGES) {
      const todo = stage.projections.filter((p) => layers.has(p) && current.blocks[l].proj[p].kind === 'float');
      if (todo.length === 0) continue;
      const width = stage.width === 'dim' ? c.dim : c.hidden;
      const acc = new HessianAccumulator(gptq, width);
      const runner = hostRunner(current, native);
      streams.forEach((x, i) => {
        runBlock(runner, l, i, x.slice());
        acc.add(runner.block.rows(seqs[i].length)[stage.input] as Float32Array);
      });
      const blocks = current.blocks.slice();
      const proj = { ...blocks[l].proj };
      for (const p of todo) {
        const lin = proj[p];
        if (lin.kind !== 'float') continue;
        proj[p] = gptqQuantizeLinear(gptq, lin, acc.h, settingsOf(layers.get(p)!));
        opts.onProgress?.(++done, total, `layers.${l}.${p}`);
      }
      blocks[l] = { ...blocks[l], proj };
      current = { ...current, blocks };
    }
    const runner = hostRunner(current, native);
    streams.forEach((x, i) => runBlock(runner, l, i, x));
  }
  return current;
}

/** A runner whose tensors are host arrays on any backend: the Hessians are accumulated on the host. */
function hostRunner(weights: LlamaWeights, native: NativeOps): Runner {
  return new Runner(weights, native, { backend: native.backend, resident: false });
}
