// The paper's claim, reproduced small (QA-LoRA, arXiv 2309.14717, Table 1's question): fine-tune a small LLaMA
// (stories260K by default) on a shifted domain (tinyshakespeare; its last 5% is the held-out test text) with the
// same budget per method and compare the test perplexity of the model as deployed:
//   (a) float base, no tuning;  (b) INT-b base, no tuning;
//   (c) LoRA on the float base, merged, then quantized to INT-b ("QLoRA, then post-training quantization");
//   (d) QA-LoRA on the INT-b base, merged — still INT-b — with mean pooling and with sum pooling.
// (b), (c) and (d) use the same quantizer (RTN and GPTQ rows). Plain LoRA is a QA-LoRA layer with group 1: its
// base is exact (β = w, q = 0) and A spans every input.
//
// Fairness (issue 13): each method gets its own learning rate, swept on seed 1 and selected on a validation split
// carved from the end of the training windows (never the test text); seeds 2, 3 then run at the selected rate.
// Mean and sum pooling differ by g in the adapter's input scale, which Adam does not undo, so one shared rate
// would favour one of them. LoRA's rate is selected per setting on its *deployed* (quantized) validation
// perplexity — its trainings do not depend on the setting, so this costs evaluations only.
//
//   npx tsx bench/paper-table.ts [--model M --tokenizer T] [--steps 80] [--seeds 1,2,3] [--bits 4,3,2]
//     [--groups 32,128] [--quantizers rtn,gptq] [--lr-lora 1e-3,…] [--lr-mean …] [--lr-sum …] [--extend 2] [--out FILE]
import { writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { parseArgs } from 'node:util';
import { parseSpec } from '../dsl/index.ts';
import { projectionShape } from '../dsl/defaults.ts';
import { PROJECTIONS, type Pool, type ResolvedSpec } from '../dsl/resolved.ts';
import { demoAssets, repoRoot as repo } from '../runtime/assets.ts';
import { PackedWindows } from '../runtime/data/dataset.ts';
import { denseWeight } from '../runtime/export/gguf.ts';
import { kernelMerger, mergeAdapters } from '../runtime/merge.ts';
import { initAdapters } from '../runtime/model/adapters.ts';
import { LlamaModel } from '../runtime/model/llama.ts';
import { loadNativeOps } from '../runtime/model/native-ops.ts';
import type { LlamaWeights } from '../runtime/model/types.ts';
import { evaluateWindows } from '../runtime/train/evaluate.ts';
import { dataTokenizerFor, openForRun, prepareData, tokenizerSource } from '../runtime/train/setup.ts';
import { train } from '../runtime/train/trainer.ts';

const { values: a } = parseArgs({
  options: {
    model: { type: 'string', default: demoAssets.model },
    tokenizer: { type: 'string' },
    data: { type: 'string', default: demoAssets.data },
    steps: { type: 'string', default: '80' },
    seeds: { type: 'string', default: '1,2,3' },
    bits: { type: 'string', default: '4,3,2' },
    groups: { type: 'string', default: '32,128' },
    quantizers: { type: 'string', default: 'rtn,gptq' },
    'batch-size': { type: 'string', default: '8' },
    'seq-len': { type: 'string', default: '128' },
    rank: { type: 'string', default: '8' },
    alpha: { type: 'string', default: '16' },
    // Half-decade grids (4 values, 30×). Sum pooling feeds the adapter g× larger inputs, so its grid sits lower.
    'lr-lora': { type: 'string', default: '1e-3,3e-3,1e-2,3e-2' },
    'lr-mean': { type: 'string', default: '3e-3,1e-2,3e-2,1e-1' },
    'lr-sum': { type: 'string', default: '3e-4,1e-3,3e-3,1e-2' },
    'eval-windows': { type: 'string', default: '64' },
    'select-windows': { type: 'string', default: '32' },
    'calib-windows': { type: 'string', default: '16' },
    extend: { type: 'string', default: '2' },
    out: { type: 'string', default: join(repo, 'bench/paper-table.md') },
  },
});
const list = (s: string) => s.split(',').map((x) => x.trim()).filter(Boolean);
const steps = Number(a.steps), batch = Number(a['batch-size']), seqLen = Number(a['seq-len']), rank = Number(a.rank), alpha = Number(a.alpha);
const seeds = list(a.seeds!).map(Number), bitsList = list(a.bits!).map(Number), groupsAsked = list(a.groups!).map(Number);
const quantizers = list(a.quantizers!) as ('rtn' | 'gptq')[];
type Method = 'lora' | 'mean' | 'sum';
const METHODS: Method[] = ['lora', 'mean', 'sum'];
const grid: Record<Method, number[]> = { lora: list(a['lr-lora']!).map(Number), mean: list(a['lr-mean']!).map(Number), sum: list(a['lr-sum']!).map(Number) };
const [seed1, ...laterSeeds] = seeds;
const t0 = performance.now();
const log = (s: string) => process.stderr.write(`[${((performance.now() - t0) / 1000).toFixed(0).padStart(5)} s] ${s}\n`);
// Seconds spent per part, for the table's footer.
const spent: Record<string, number> = {};
async function timed<T>(part: string, f: () => Promise<T> | T): Promise<T> {
  const t = performance.now();
  try { return await f(); } finally { spent[part] = (spent[part] ?? 0) + (performance.now() - t) / 1000; }
}

const { model: floatModel, tokenizer } = await openForRun({ model: a.model!, tokenizer: a.tokenizer });
const floatW = floatModel.weights;
const cfg = floatW.config;
const modelName = basename(a.model!).replace(/\.(bin|gguf|safetensors)$/, '');

// The group a projection with `inF` inputs gets for a row of group g: g when it divides, else the divisor of inF
// nearest g (stories260K's down, 172 = 4·43, takes 43 for 32).
function groupFor(inF: number, g: number): number {
  if (inF % g === 0) return g;
  let best = 1;
  for (let d = 1; d <= inF; d++) if (inF % d === 0 && Math.abs(Math.log(d / g)) < Math.abs(Math.log(best / g))) best = d;
  return best;
}
// A group row runs only where g divides the attention/MLP input (dim); a group wider than it would be a rank-1
// adapter on every projection, not the setting the paper means.
const groups = groupsAsked.filter((g) => cfg.dim % g === 0);
for (const g of groupsAsked) if (!groups.includes(g)) log(`group ${g} skipped: it does not divide dim ${cfg.dim}`);
const overridden = (g: number) => PROJECTIONS.filter((p) => groupFor(projectionShape(p, cfg).in, g) !== g);

/** The model's shape with every projection at (bits, group), pooling `pool`. */
function spec(name: string, bits: number, group: number, pool: Pool): ResolvedSpec {
  const text = `model ${name} {
  llama { dim ${cfg.dim}  hidden ${cfg.hidden}  layers ${cfg.layers}  heads ${cfg.heads}  kv_heads ${cfg.kvHeads}  vocab ${cfg.vocab}  context ${cfg.context} }
  qalora { bits ${bits}  group ${group}  rank ${rank}  alpha ${alpha}  dropout 0.05  pool ${pool}  dtype fp32 }
  adapters all_linear
${overridden(group).map((p) => `  override ${p} { group ${groupFor(projectionShape(p, cfg).in, group)} }`).join('\n')}
  target cpu
}`;
  const r = parseSpec(text, `${name}.qal`);
  if (!r.spec) throw new Error(`${name}: ${r.diagnostics.map((d) => d.message).join('; ')}`);
  return r.spec;
}

// Test: the last 5% (data.split.val), only for the reported numbers. Selection: the last 5% of the training
// windows, held out of every fine-tune.
const data = prepareData(a.data!, dataTokenizerFor(tokenizer, tokenizerSource(a.model!, a.tokenizer)), seqLen, 0.05);
const test = data.split.val!, all = data.split.train;
const nSelect = Math.max(1, Math.ceil(all.count * 0.05));
const trainW = new PackedWindows(all.stream, seqLen, 0, all.count - nSelect);
const selectW = new PackedWindows(all.stream, seqLen, all.count - nSelect, nSelect);
const testN = Math.min(Number(a['eval-windows']), test.count), selectN = Math.min(Number(a['select-windows']), selectW.count);
const pplOn = (w: PackedWindows, n: number) => (m: Pick<LlamaModel, 'loss'>) => timed('evaluate', () => evaluateWindows(m, w, 8, n).perplexity);
const testPpl = pplOn(test, testN), selectPpl = pplOn(selectW, selectN);
// GPTQ calibrates on training windows (never the held-out ones), as the paper calibrated on other text.
const calibWin = new PackedWindows(trainW.stream, seqLen, 0, Math.min(Number(a['calib-windows']), trainW.count));
const calib = { sequences: Array.from({ length: calibWin.count }, (_, i) => calibWin.batch([i]).tokens) };
log(`${modelName}: dim ${cfg.dim}, hidden ${cfg.hidden}, ${cfg.layers} layers; data ${data.tokens} tokens: ${trainW.count} training, ${selectW.count} selection (scoring ${selectN}), ${test.count} test windows (scoring ${testN}) of ${seqLen}`);

let trainings = 0;
async function fineTune(model: LlamaModel, method: Method, lr: number, seed: number, tag: string): Promise<void> {
  model.adapters = initAdapters(model.weights, seed);
  const pool: Pool = method === 'sum' ? 'sum' : 'mean';
  trainings++;
  const r = await timed(`train ${method}`, () => train({
    model, train: trainW, val: null, outDir: join(repo, '.cache', 'paper-table', tag),
    adapterInfo: { kind: 'qalora', groups: {}, pool, dropout: 0.05 },
    lr, schedule: 'constant', warmup: 0.03, batchSize: batch, gradAccum: 1, totalSteps: steps, evalEvery: 0, evalWindows: 0,
    saveEvery: 0, seed, maxGradNorm: 0.3, weightDecay: 0, resume: false, quiet: true, plot: false, handleSigint: false, printSummary: false,
  }));
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
const deploy = (w: LlamaWeights, s?: ResolvedSpec, q?: 'rtn' | 'gptq') =>
  timed('quantize', () => LlamaModel.create(w, { backend: 'cpu', spec: s, quantize: q, calib, adapters: s ? noAdapters(w) : undefined }));
const floatPpl = await testPpl(floatModel);
log(`(a) float base: ${floatPpl.toFixed(3)}`);

// (c): LoRA on the float base, trained once per (rate, seed) on demand; the quantization comes after the merge.
const loraSpec = spec(`${modelName}_lora`, 8, 1, 'mean');
const loraRuns = new Map<string, LlamaWeights>();
async function loraMerged(lr: number, seed: number): Promise<LlamaWeights> {
  const key = `${lr}/${seed}`;
  if (!loraRuns.has(key)) {
    const m = await LlamaModel.create(floatW, { backend: 'cpu', spec: loraSpec, seed });
    await fineTune(m, 'lora', lr, seed, `lora-lr${lr}-s${seed}`);
    loraRuns.set(key, toFloat(await merged(m)));
  }
  return loraRuns.get(key)!;
}

interface Cell { lr: number; rates: number[]; sweep: number[]; test: number[] }
// A selected rate at the grid's edge may not be the method's best: the sweep steps past that edge, by the grid's own
// ratio, until the best rate is interior (at most `extend` steps each way).
const extend = Number(a['extend']);
/** Sweeps `grid` on seed 1 by selection perplexity, then runs the later seeds at the best rate; test ppl per seed. */
async function tuned(grid: number[], run: (lr: number, seed: number) => Promise<LlamaModel>): Promise<Cell> {
  const rates = [...grid], first = new Map<number, LlamaModel>(), sweepAt = new Map<number, number>();
  const score = async (lr: number) => {
    const m = await run(lr, seed1);
    first.set(lr, m);
    sweepAt.set(lr, await selectPpl(m));
  };
  for (const lr of rates) await score(lr);
  const bestRate = () => rates.reduce((b, r) => (sweepAt.get(r)! < sweepAt.get(b)! ? r : b));
  for (let up = 0, down = 0; rates.length > 1;) {
    const best = bestRate(), n = rates.length;
    let next: number;
    if (best === rates[n - 1] && up++ < extend) rates.push(next = +(rates[n - 1] ** 2 / rates[n - 2]).toPrecision(3));
    else if (best === rates[0] && down++ < extend) rates.unshift(next = +(rates[0] ** 2 / rates[1]).toPrecision(3));
    else break;
    log(`  rate ${best} is at the sweep's edge: trying ${next}`);
    await score(next);
  }
  const lr = bestRate(), test = [await testPpl(first.get(lr)!)];
  for (const seed of laterSeeds) test.push(await testPpl(await run(lr, seed)));
  return { lr, rates, sweep: rates.map((r) => sweepAt.get(r)!), test };
}

// LoRA deployed in float (16-bit, not INT-b): the reference the quantized rows lose against.
const loraFloat = await tuned(grid.lora, async (lr, seed) => deploy(await loraMerged(lr, seed)));
log(`LoRA merged, float: lr ${loraFloat.lr}, ${loraFloat.test.map((x) => x.toFixed(3)).join(', ')}`);

interface Row { bits: number; group: number; quantizer: string; base: number; cells: Record<Method, Cell> }
const rows: Row[] = [];
for (const bits of bitsList) {
  for (const group of groups) {
    const specs = { mean: spec(`${modelName}_b${bits}_g${group}`, bits, group, 'mean'), sum: spec(`${modelName}_b${bits}_g${group}_sum`, bits, group, 'sum') };
    for (const q of quantizers) {
      const base = await deploy(floatW, specs.mean, q);
      const baseW = base.weights;
      const cells = {} as Record<Method, Cell>;
      cells.lora = await tuned(grid.lora, async (lr, seed) => deploy(await loraMerged(lr, seed), specs.mean, q));
      for (const pool of ['mean', 'sum'] as const) {
        cells[pool] = await tuned(grid[pool], async (lr, seed) => {
          // The quantized base takes the spec's settings (pooling included) as it is; no re-quantization.
          const d = await LlamaModel.create(baseW, { backend: 'cpu', spec: specs[pool], seed });
          await fineTune(d, pool, lr, seed, `qalora-${modelName}-b${bits}-g${group}-${q}-${pool}-lr${lr}-s${seed}`);
          return deploy(await merged(d), specs[pool]);
        });
      }
      const row: Row = { bits, group, quantizer: q.toUpperCase(), base: await testPpl(base), cells };
      rows.push(row);
      log(`b${bits} g${group} ${q}: base ${row.base.toFixed(2)}; ` + METHODS.map((m) => `${m} lr ${cells[m].lr}: ${cells[m].test.map((x) => x.toFixed(2))}`).join('; '));
    }
  }
}

const mean = (x: number[]) => x.reduce((p, v) => p + v, 0) / x.length;
const sd = (x: number[]) => (x.length > 1 ? Math.sqrt(x.reduce((p, v) => p + (v - mean(x)) ** 2, 0) / (x.length - 1)) : 0);
const fmt = (x: number[]) => `${mean(x).toFixed(2)} ± ${sd(x).toFixed(2)}`;
const lrs = (m: Method) => grid[m].join(', ');
// A rate still at the sweep's edge after extending may not be the method's best: the sweep table marks it.
const edge = (c: Cell) => (c.lr === c.rates[0] || c.lr === c.rates[c.rates.length - 1] ? '†' : '');
const bestQa = (r: Row) => Math.min(mean(r.cells.mean.test), mean(r.cells.sum.test));
const wins = (rs: Row[]) => rs.filter((r) => bestQa(r) < mean(r.cells.lora.test)).length;
const minutes = (performance.now() - t0) / 60000;
const groupNote = groups.map((g) => {
  const o = overridden(g);
  return o.length ? `in the g = ${g} rows ${o.map((p) => `${p} (in = ${projectionShape(p, cfg).in}) uses group ${groupFor(projectionShape(p, cfg).in, g)}`).join(', ')}` : '';
}).filter(Boolean).join('; ');
const skipped = groupsAsked.filter((g) => !groups.includes(g));
const cmd = `npx tsx bench/paper-table.ts${a.model === demoAssets.model ? '' : ` --model ${a.model}`}${a.tokenizer ? ` --tokenizer ${a.tokenizer}` : ''} --steps ${steps} --seeds ${seeds.join(',')} --bits ${bitsList.join(',')} --groups ${groupsAsked.join(',')} --quantizers ${quantizers.join(',')} --batch-size ${batch} --seq-len ${seqLen} --rank ${rank} --alpha ${alpha} --lr-lora ${grid.lora.join(',')} --lr-mean ${grid.mean.join(',')} --lr-sum ${grid.sum.join(',')} --eval-windows ${testN} --select-windows ${selectN} --calib-windows ${calibWin.count} --extend ${extend}${a.out === join(repo, 'bench/paper-table.md') ? '' : ` --out ${a.out}`}`;
const cellText = (r: Row, m: Method) => {
  const best = METHODS.every((o) => mean(r.cells[m].test) <= mean(r.cells[o].test));
  return best ? `**${fmt(r.cells[m].test)}**` : fmt(r.cells[m].test);
};
// Rates the sweep added past the grid's edges are named, since the column's grid does not list them.
const sweepText = (m: Method, c: Cell) => c.rates.map((r, i) => {
  const p = c.sweep[i].toFixed(2), v = r === c.lr ? `**${p}**` : p;
  return grid[m].includes(r) ? v : `(${r}) ${v}`;
}).join(' / ') + edge(c);
const md = `# QA-LoRA vs LoRA-then-quantize on ${modelName} → ${basename(a.data!, '.txt')}

Test perplexity of the **deployed** model (lower is better) on the last 5% of ${basename(a.data!)} (${testN} windows × ${seqLen}
tokens), after fine-tuning ${modelName} (dim ${cfg.dim}, hidden ${cfg.hidden}, ${cfg.layers} layers) on the rest. Every fine-tune has the same budget:
${steps} steps × ${batch} sequences × ${seqLen} tokens, AdamW constant rate (3% warmup), clip 0.3, rank ${rank}, alpha ${alpha},
dropout 0.05, all seven projections. Each method's rate is swept on seed 1 (LoRA ${lrs('lora')}; QA-LoRA mean
pooling ${lrs('mean')}; sum pooling ${lrs('sum')}) and selected on a validation split (the last 5% of the training
windows, ${selectN} scored, never trained on); a best rate at the grid's edge sends the sweep one step further (by the grid's
ratio, up to ${extend} steps each way); seeds ${laterSeeds.join(', ')} then run at the selected rate. Mean ± standard deviation over
seeds ${seeds.join(', ')} (adapter init, data order, dropout). LoRA's rate is selected per row on its quantized model.
${groupNote ? `Groups: ${groupNote}. ` : ''}${skipped.length ? `Group ${skipped.join(', ')} does not divide dim ${cfg.dim}: not run. ` : ''}${quantizers.includes('gptq') ? `GPTQ calibrates on ${calibWin.count} training windows.` : ''}

- (a) float base, no tuning: **${floatPpl.toFixed(2)}**
- LoRA on the float base, merged, deployed in float (16-bit; not INT-b): ${fmt(loraFloat.test)} (rate ${loraFloat.lr})

| bits | group | quantizer | (b) INT-b base | (c) LoRA → merge → quantize | (d) QA-LoRA mean, merged | (d) QA-LoRA sum, merged | (c) − best (d) |
|---:|---:|:---|---:|---:|---:|---:|---:|
${rows.map((r) => `| ${r.bits} | ${r.group} | ${r.quantizer} | ${r.base.toFixed(2)} | ${METHODS.map((m) => cellText(r, m)).join(' | ')} | ${(mean(r.cells.lora.test) - bestQa(r)).toFixed(2)} |`).join('\n')}

Bold: the best deployed model of the row. QA-LoRA (the better pooling) beats LoRA-then-quantize in ${wins(rows)} of
${rows.length} settings: ${bitsList.map((b) => `${b}-bit ${wins(rows.filter((r) => r.bits === b))}/${rows.filter((r) => r.bits === b).length}`).join(', ')}.

Selected rates and the sweep (validation perplexity at each rate of the grid, seed 1; bold: selected;
(r): a rate the sweep added past the grid's edge; †: still at the sweep's edge, so the best rate may lie outside it):

| bits | group | quantizer | LoRA → quantize | QA-LoRA mean | QA-LoRA sum |
|---:|---:|:---|:---|:---|:---|
| float | – | – | ${loraFloat.lr}: ${sweepText('lora', loraFloat)} | | |
${rows.map((r) => `| ${r.bits} | ${r.group} | ${r.quantizer} | ${METHODS.map((m) => `${r.cells[m].lr}: ${sweepText(m, r.cells[m])}`).join(' | ')} |`).join('\n')}

Produced by \`${cmd}\` in ${minutes.toFixed(1)} minutes on ${process.platform} (2 cores, shared), ${new Date().toISOString().slice(0, 10)}.
Time by part (minutes): ${Object.entries(spent).map(([k, v]) => `${k} ${(v / 60).toFixed(1)}`).join(', ')} (${trainings} fine-tunes, ${loraRuns.size} of them LoRA).
`;
writeFileSync(a.out!, md);
process.stdout.write(md);
