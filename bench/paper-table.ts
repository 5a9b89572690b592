// The paper's claim, reproduced small (QA-LoRA, arXiv 2309.14717, Table 1's question): fine-tune stories260K on
// a shifted domain (tinyshakespeare; the last 5% held out) with the same budget per method and compare the
// held-out perplexity of the model as deployed:
//   (a) float base, no tuning;  (b) INT-b base, no tuning;
//   (c) LoRA on the float base, merged, then quantized to INT-b ("QLoRA, then post-training quantization");
//   (d) QA-LoRA on the INT-b base, merged — still INT-b.
// (b), (c) and (d) use the same quantizer (RTN and GPTQ rows). Plain LoRA is a QA-LoRA layer with group 1: its
// base is exact (β = w, q = 0) and A spans every input. Writes bench/paper-table.md.
//
//   npx tsx bench/paper-table.ts [--steps 80] [--seeds 1,2] [--bits 4,3,2] [--groups 32,8] [--quantizers rtn,gptq]
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { parseSpec } from '../dsl/index.ts';
import { demoAssets, repoRoot as repo } from '../runtime/assets.ts';
import type { ResolvedSpec } from '../dsl/resolved.ts';
import { PackedWindows } from '../runtime/data/dataset.ts';
import { denseWeight } from '../runtime/export/gguf.ts';
import { kernelMerger, mergeAdapters } from '../runtime/merge.ts';
import { initAdapters } from '../runtime/model/adapters.ts';
import { LlamaModel } from '../runtime/model/llama.ts';
import { loadNativeOps } from '../runtime/model/native-ops.ts';
import type { LlamaWeights } from '../runtime/model/types.ts';
import { evaluateWindows } from '../runtime/train/evaluate.ts';
import { dataTokenizerFor, openForRun, prepareData } from '../runtime/train/setup.ts';
import { train } from '../runtime/train/trainer.ts';

const { values: a } = parseArgs({
  options: {
    steps: { type: 'string', default: '80' },
    seeds: { type: 'string', default: '1,2' },
    bits: { type: 'string', default: '4,3,2' },
    groups: { type: 'string', default: '32,8' },
    quantizers: { type: 'string', default: 'rtn,gptq' },
    'batch-size': { type: 'string', default: '8' },
    'seq-len': { type: 'string', default: '128' },
    lr: { type: 'string', default: '3e-3' },
    rank: { type: 'string', default: '8' },
    'eval-windows': { type: 'string', default: '64' },
    'calib-windows': { type: 'string', default: '16' },
    out: { type: 'string', default: join(repo, 'bench/paper-table.md') },
  },
});
const list = (s: string) => s.split(',').map((x) => x.trim()).filter(Boolean);
const steps = Number(a.steps), batch = Number(a['batch-size']), seqLen = Number(a['seq-len']), lr = Number(a.lr), rank = Number(a.rank);
const seeds = list(a.seeds!).map(Number), bitsList = list(a.bits!).map(Number), groups = list(a.groups!).map(Number);
const quantizers = list(a.quantizers!) as ('rtn' | 'gptq')[];
const t0 = performance.now();
const log = (s: string) => process.stderr.write(`[${((performance.now() - t0) / 1000).toFixed(0).padStart(4)} s] ${s}\n`);

// down's input is 172 = 4·43: it takes the divisor of 172 nearest the group (43 for 32, 4 for 8 or 16).
const downGroup = (g: number) => (g === 1 ? 1 : [1, 2, 4, 43, 86, 172].reduce((b, d) => (Math.abs(Math.log(d / g)) < Math.abs(Math.log(b / g)) ? d : b)));

/** stories260K with every projection at (bits, group). */
function spec(name: string, bits: number, group: number): ResolvedSpec {
  const text = `model ${name} {
  llama { dim 64  hidden 172  layers 5  heads 8  kv_heads 4  vocab 512  context 512 }
  qalora { bits ${bits}  group ${group}  rank ${rank}  alpha 16  dropout 0.05  pool mean  dtype fp32 }
  adapters all_linear
  override down { group ${downGroup(group)} }
  target cpu
}`;
  const r = parseSpec(text, `${name}.qal`);
  if (!r.spec) throw new Error(`${name}: ${r.diagnostics.map((d) => d.message).join('; ')}`);
  return r.spec;
}

const { model: floatModel, tokenizer } = await openForRun({ model: demoAssets.model });
const floatW = floatModel.weights;
const data = prepareData(demoAssets.data, dataTokenizerFor(tokenizer, demoAssets.tokenizer), seqLen, 0.05);
const val = data.split.val!;
const evalWindows = Math.min(Number(a['eval-windows']), val.count);
const ppl = (m: Pick<LlamaModel, 'loss'>) => evaluateWindows(m, val, 8, evalWindows).perplexity;
// GPTQ calibrates on training windows (never the held-out ones), as the paper calibrated on other text.
const calibWin = new PackedWindows(data.split.train.stream, seqLen, 0, Math.min(Number(a['calib-windows']), data.split.train.count));
const calib = { sequences: Array.from({ length: calibWin.count }, (_, i) => calibWin.batch([i]).tokens) };
log(`data: ${data.tokens} tokens, ${data.split.train.count} training windows, ${val.count} held out (evaluating ${evalWindows} × ${seqLen} tokens)`);

async function fineTune(model: LlamaModel, seed: number, tag: string): Promise<void> {
  model.adapters = initAdapters(model.weights, seed);
  const r = await train({
    model, train: data.split.train, val: null, outDir: join(repo, '.cache', 'paper-table', tag),
    adapterInfo: { kind: 'qalora', groups: {}, pool: 'mean', dropout: 0.05 },
    lr, schedule: 'constant', warmup: 0.03, batchSize: batch, gradAccum: 1, totalSteps: steps, evalEvery: 0, evalWindows: 0,
    saveEvery: 0, seed, maxGradNorm: 0.3, weightDecay: 0, resume: false, quiet: true, plot: false, handleSigint: false, printSummary: false,
  });
  log(`  ${tag}: loss ${r.losses[0].toFixed(3)} → ${r.losses[r.losses.length - 1].toFixed(3)} (${Math.round(r.tokensPerSecond)} tok/s)`);
}

async function merged(model: LlamaModel): Promise<LlamaWeights> {
  const native = await loadNativeOps(model.spec, 'cpu');
  return mergeAdapters(model.weights, model.adapters, kernelMerger({ cpu: native.kernels } as never, 'cpu')).weights;
}

/** A merged group-1 model back to float weights (β' is W + s·B·A exactly; q = 0, α = 1). */
function toFloat(w: LlamaWeights): LlamaWeights {
  return { ...w, blocks: w.blocks.map((b) => ({ ...b, proj: Object.fromEntries(Object.entries(b.proj).map(([p, lin]) => [p, { kind: 'float', out: lin.out, in: lin.in, w: denseWeight(lin) }])) as never })) };
}

const noAdapters = (w: LlamaWeights) => w.blocks.map(() => ({}));
const floatPpl = ppl(floatModel);
log(`(a) float base: ${floatPpl.toFixed(3)}`);

// (c) step 1: LoRA on the float base, once per seed (the quantization comes after the merge).
const loraSpec = spec('s260_lora', 8, 1);
const loraMerged: LlamaWeights[] = [];
const loraFloatPpl: number[] = [];
for (const seed of seeds) {
  const m = await LlamaModel.create(floatW, { backend: 'cpu', spec: loraSpec, seed });
  await fineTune(m, seed, `lora-s${seed}`);
  const w = toFloat(await merged(m));
  loraMerged.push(w);
  loraFloatPpl.push(ppl(await LlamaModel.create(w, { backend: 'cpu' })));
}
log(`LoRA merged, float (16-bit deploy): ${loraFloatPpl.map((x) => x.toFixed(3)).join(', ')}`);

interface Row { bits: number; group: number; quantizer: string; base: number; lora: number[]; qalora: number[] }
const rows: Row[] = [];
for (const bits of bitsList) {
  for (const group of groups) {
    const s = spec(`s260_b${bits}_g${group}`, bits, group);
    for (const q of quantizers) {
      const base = await LlamaModel.create(floatW, { backend: 'cpu', spec: s, quantize: q, calib });
      const row: Row = { bits, group, quantizer: q.toUpperCase(), base: ppl(base), lora: [], qalora: [] };
      for (let i = 0; i < seeds.length; i++) {
        const c = await LlamaModel.create(loraMerged[i], { backend: 'cpu', spec: s, quantize: q, calib, adapters: noAdapters(floatW) });
        row.lora.push(ppl(c));
        const d = await LlamaModel.create(base.weights, { backend: 'cpu', spec: s, seed: seeds[i] });
        await fineTune(d, seeds[i], `qalora-b${bits}-g${group}-${q}-s${seeds[i]}`);
        row.qalora.push(ppl(await LlamaModel.create(await merged(d), { backend: 'cpu', spec: s, adapters: noAdapters(floatW) })));
      }
      rows.push(row);
      log(`b${bits} g${group} ${q}: base ${row.base.toFixed(2)}, LoRA→quant ${row.lora.map((x) => x.toFixed(2))}, QA-LoRA ${row.qalora.map((x) => x.toFixed(2))}`);
    }
  }
}

const mean = (x: number[]) => x.reduce((p, v) => p + v, 0) / x.length;
const sd = (x: number[]) => (x.length > 1 ? Math.sqrt(x.reduce((p, v) => p + (v - mean(x)) ** 2, 0) / (x.length - 1)) : 0);
const fmt = (x: number[]) => `${mean(x).toFixed(2)} ± ${sd(x).toFixed(2)}`;
const minutes = (performance.now() - t0) / 60000;
const cmd = `npx tsx bench/paper-table.ts --steps ${steps} --seeds ${seeds.join(',')} --bits ${bitsList.join(',')} --groups ${groups.join(',')} --quantizers ${quantizers.join(',')} --batch-size ${batch} --seq-len ${seqLen} --lr ${lr} --rank ${rank} --eval-windows ${evalWindows} --calib-windows ${calibWin.count}`;
const wins = rows.filter((r) => mean(r.qalora) < mean(r.lora)).length;
const md = `# QA-LoRA vs LoRA-then-quantize on stories260K → tinyshakespeare

Held-out perplexity of the **deployed** model (lower is better) on the last 5% of tinyshakespeare
(${evalWindows} windows × ${seqLen} tokens), after fine-tuning stories260K (a TinyStories model) on the rest.
Every fine-tune has the same budget: ${steps} steps × ${batch} sequences × ${seqLen} tokens, AdamW lr ${lr} constant
(3% warmup), clip 0.3, rank ${rank}, alpha 16, dropout 0.05, all seven projections. Mean ± standard deviation over
seeds ${seeds.join(', ')} (adapter init, data order, dropout). down_proj (in = 172) uses group ${groups.map((g) => `${downGroup(g)} in the g = ${g} rows`).join(', ')}.
GPTQ calibrates on ${calibWin.count} training windows of ${seqLen} tokens.

- (a) float base, no tuning: **${floatPpl.toFixed(2)}**
- LoRA on the float base, merged, deployed in float (16-bit; not INT-b): ${fmt(loraFloatPpl)}

| bits | group | quantizer | (b) INT-b base | (c) LoRA → merge → quantize | (d) QA-LoRA, merged (INT-b) | (c) − (d) |
|---:|---:|:---|---:|---:|---:|---:|
${rows.map((r) => {
  const qaWins = mean(r.qalora) < mean(r.lora);
  const c = qaWins ? fmt(r.lora) : `**${fmt(r.lora)}**`, d = qaWins ? `**${fmt(r.qalora)}**` : fmt(r.qalora);
  return `| ${r.bits} | ${r.group} | ${r.quantizer} | ${r.base.toFixed(2)} | ${c} | ${d} | ${(mean(r.lora) - mean(r.qalora)).toFixed(2)} |`;
}).join('\n')}

Bold: the better deployed model of (c) and (d). QA-LoRA's merged INT-b model beats LoRA-then-quantize in ${wins} of
${rows.length} settings: ${bitsList.map((b) => `${b}-bit ${rows.filter((r) => r.bits === b && mean(r.qalora) < mean(r.lora)).length}/${rows.filter((r) => r.bits === b).length}`).join(', ')}.

Produced by \`${cmd}\` in ${minutes.toFixed(1)} minutes on ${process.platform} (2 cores), ${new Date().toISOString().slice(0, 10)}.
`;
writeFileSync(a.out!, md);
process.stdout.write(md);
