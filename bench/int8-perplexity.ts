// What `--activations int8` costs in quality: each fixture model of ../shared on held-out text, decoded token by
// token (one row per step: the GEMV that int8 activations change), with fp32 and with int8 activations on the
// same quantized base, and the perplexity of each (issue 10, item 1).
//
//   npx tsx bench/int8-perplexity.ts [--tokens 1024] [--bits 4] [--group 32] [--window 256]
//
// Text: the held-out last 5% of data/tinystories/tinystories-2MiB.txt for the TinyStories models (stories5M was
// trained on the first 95%), and aidreams260K's own golden greedy text for it (its training text is not in
// ../shared). Projections whose input is not a multiple of the group (down at hidden 172) get the divisor of
// their input nearest to it (43), the hint `qalora check` gives; int8 applies only where the group is whole
// 32-blocks, so those stay exact in both columns.
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { parseSpec } from '../dsl/index.ts';
import { nearestDivisor, projectionShape } from '../dsl/defaults.ts';
import { PROJECTIONS, type ResolvedSpec } from '../dsl/resolved.ts';
import { repoRoot } from '../runtime/assets.ts';
import type { LlamaModel } from '../runtime/model/llama.ts';
import { openModel } from '../runtime/model/open.ts';
import type { LlamaConfig } from '../runtime/model/types.ts';

const { values: o } = parseArgs({
  options: {
    tokens: { type: 'string', default: '1024' },
    bits: { type: 'string', default: '4' },
    group: { type: 'string', default: '32' },
    window: { type: 'string', default: '256' },
  },
});
const shared = (rel: string) => resolve(process.env.QALORA_FIXTURES ?? resolve(repoRoot, '..', 'shared'), rel);
const bits = Number(o.bits), group = Number(o.group), tokens = Number(o.tokens), window = Number(o.window);

const heldOut = () => {
  const text = readFileSync(shared('data/tinystories/tinystories-2MiB.txt'), 'utf8');
  return text.slice(Math.floor(text.length * 0.95));
};
const fixtures = [
  { name: 'stories260K', model: 'models/stories260K/stories260K.bin', text: heldOut },
  { name: 'aidreams260K', model: 'models/aidreams260K/aidreams260K.bin', text: () => readFileSync(shared('golden/aidreams260K_greedy_n128.txt'), 'utf8') },
  { name: 'stories5M', model: 'models/stories5M/stories5M.bin', text: heldOut },
];

function specFor(name: string, cfg: LlamaConfig): ResolvedSpec {
  const shape = { dim: cfg.dim, hidden: cfg.hidden, heads: cfg.heads, kvHeads: cfg.kvHeads };
  const odd = PROJECTIONS.filter((p) => projectionShape(p, shape).in % group !== 0);
  const text = `model ${name}_int8 {
  llama { dim ${cfg.dim}  hidden ${cfg.hidden}  layers ${cfg.layers}  heads ${cfg.heads}  kv_heads ${cfg.kvHeads}  vocab ${cfg.vocab}  context ${cfg.context} }
  qalora { bits ${bits}  group ${group}  rank 0  alpha 1  dropout 0  pool mean  dtype fp32 }
  adapters all_linear
${odd.map((p) => `  override ${p} { group ${nearestDivisor(projectionShape(p, shape).in, group)} }`).join('\n')}
  target cpu
}`;
  const r = parseSpec(text, `${name}_int8.qal`);
  if (!r.spec) throw new Error(`${name}: ${r.diagnostics.map((d) => d.message).join('; ')}`);
  return r.spec;
}

/** Mean next-token NLL over `ids`, decoded one token per step in windows of `window`. */
function decodeNll(model: LlamaModel, ids: number[]): number {
  const span = Math.min(window, model.config.context);
  let sum = 0, n = 0;
  for (let w0 = 0; w0 + 1 < ids.length; w0 += span) {
    const part = ids.slice(w0, Math.min(ids.length, w0 + span));
    const s = model.newSession();
    let logits = s.step(part[0]);
    for (let t = 1; t < part.length; t++) {
      let max = -Infinity;
      for (const v of logits) max = Math.max(max, v);
      let z = 0;
      for (const v of logits) z += Math.exp(v - max);
      sum += Math.log(z) + max - logits[part[t]];
      n++;
      if (t + 1 < part.length) logits = s.step(part[t]);
    }
  }
  return sum / n;
}

const rows: string[] = [];
for (const f of fixtures) {
  const path = shared(f.model);
  const probe = await openModel({ model: path });
  const spec = specFor(f.name, probe.model.config);
  const { model, tokenizer } = await openModel({ model: path, spec });
  const ids = tokenizer.encode(f.text(), { bos: true }).slice(0, tokens);
  const nll: Record<string, number> = {};
  for (const mode of ['fp32', 'int8'] as const) {
    model.activations = mode;
    nll[mode] = decodeNll(model, ids);
  }
  const ppl = (x: number) => Math.exp(x);
  const int8Layers = spec.layers.filter((l) => l.group % 32 === 0).map((l) => l.name).join(', ');
  rows.push(`| ${f.name} | ${ids.length} | ${ppl(nll.fp32).toFixed(4)} | ${ppl(nll.int8).toFixed(4)} | ${(100 * (ppl(nll.int8) / ppl(nll.fp32) - 1)).toFixed(3)}% | ${int8Layers || '-'} |`);
  process.stderr.write(`${f.name}: done\n`);
}
process.stdout.write(`${bits}-bit, group ${group} (RTN), rank 0; decoded one token per step in windows of ${window} (or the model's context)\n\n` +
  '| model | tokens | perplexity, fp32 activations | perplexity, int8 activations | cost | layers int8 applies to |\n|---|---:|---:|---:|---:|---|\n' +
  rows.join('\n') + '\n');
