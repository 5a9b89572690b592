// Resolution: a read model/spec plus defaults → ResolvedSpec, with the checks that need the whole picture
// (shape consistency, group divides in_features, rank against in/group). A setting keeps the place it was
// written, so a bad inherited value is reported once, where it was set, however many layers it breaks.
import type { Loc } from './diagnostics.ts';
import { DEFAULT_CUDA_ARCHS, DEFAULT_NORM_EPS, DEFAULT_ROPE_THETA, DEFAULT_SETTINGS, LLAMA_KEYS, REQUIRED_LLAMA_KEYS, divisors, nearestDivisor, projectionShape } from './defaults.ts';
import { Reporter, listWords, toIdentifier } from './read.ts';
import { PROJECTIONS, type ModelShape, type Projection, type QaloraSettings, type ResolvedLayer, type ResolvedSpec, type TableTypes, type Targets } from './resolved.ts';
import type { ModelDef, QKey, Scope, Settings, ShapeKey, SpecDef, TablesDef, TargetsAcc } from './validate.ts';

interface Resolved<T> {
  value: T;
  /** Where it was set; undefined for the built-in default. */
  loc?: Loc;
  /** A bad value was given somewhere in the chain: do not check what depends on it. */
  tainted: boolean;
}

function pick<K extends QKey>(key: K, chain: readonly Settings[]): Resolved<QaloraSettings[K]> {
  for (const s of chain) {
    const v = s[key];
    if (v === null) return { value: DEFAULT_SETTINGS[key], tainted: true };
    if (v) return { value: v.value as QaloraSettings[K], loc: v.loc, tainted: false };
  }
  return { value: DEFAULT_SETTINGS[key], tainted: false };
}

interface Candidate {
  name: string;
  projection?: Projection;
  inFeatures: number;
  outFeatures: number;
  inKey?: string;
  chain: Settings[];
  hasAdapter: boolean;
  count: number;
}

export function resolve(r: Reporter, def: ModelDef | SpecDef, defaults: Scope, rootFile: string): ResolvedSpec | undefined {
  const name = def.name ? def.name.value : toIdentifier(rootFile.replace(/^.*[\\/]/, '').replace(/\.qal$/, ''));
  const anchor = def.name?.loc ?? def.keyLoc;
  const targets = resolveTargets(def.scope.targets ?? defaults.targets);
  let model: ModelShape | undefined;
  let tables: TableTypes | undefined;
  let candidates: Candidate[] = [];
  if (def.kind === 'model') {
    model = resolveShape(r, def);
    if (!model) return undefined;
    if (def.tables) {
      tables = resolveTables(r, def.tables, model);
      if (!tables) return undefined;
    }
    const adapters = def.scope.adapters === undefined ? defaults.adapters : def.scope.adapters;
    if (adapters === null) return undefined; // bad adapters list, already reported
    const withAdapter = adapters ? adapters.set : new Set(PROJECTIONS);
    for (const [p, o] of def.overrides) {
      const rank = o.settings.rank;
      if (rank && rank.value > 0 && !withAdapter.has(p)) {
        r.error(rank.loc, `override sets rank ${rank.value} for \`${p}\`, but \`${p}\` has no adapter`, `\`${p}\` is not listed in \`adapters\`: add it there, or drop this rank`);
      }
    }
    const m = model;
    candidates = PROJECTIONS.map((p) => {
      const shape = projectionShape(p, m);
      const o = def.overrides.get(p);
      return {
        name: p, projection: p, inFeatures: shape.in, outFeatures: shape.out, inKey: shape.inKey,
        chain: [o?.settings ?? {}, def.scope.qalora, defaults.qalora], hasAdapter: withAdapter.has(p), count: m.layers,
      };
    });
  } else {
    if (def.layers.length === 0) {
      r.error(anchor, `spec \`${name}\` has no layers`, 'add `layer NAME { in N out M }`, or write a `model` with a `llama` shape');
      return undefined;
    }
    for (const l of def.layers) {
      const missing = [l.inFeatures === undefined ? 'in' : '', l.outFeatures === undefined ? 'out' : ''].filter(Boolean);
      if (missing.length) r.error(l.name!.loc, `layer \`${l.name!.value}\` is missing ${missing.map((k) => `\`${k}\``).join(' and ')}`, 'a layer needs `in N out M`: its input and output features');
      if (!l.inFeatures || !l.outFeatures) continue;
      candidates.push({
        name: l.name!.value, inFeatures: l.inFeatures.value, outFeatures: l.outFeatures.value,
        chain: [l.settings, def.scope.qalora, defaults.qalora], hasAdapter: true, count: 1,
      });
    }
    if (candidates.length !== def.layers.length) return undefined;
  }
  const layers = candidates.map((c) => resolveLayer(c));
  checkGroups(r, candidates, layers, anchor, def.kind === 'model');
  checkRanks(r, candidates, layers, anchor);
  return { name, file: rootFile, ...(model ? { model } : {}), ...(tables ? { tables } : {}), layers: layers.map((l) => l.layer), targets };
}

function resolveLayer(c: Candidate): { layer: ResolvedLayer; group: Resolved<number>; rank: Resolved<number> } {
  const group = pick('group', c.chain);
  const rank = pick('rank', c.chain);
  const layer: ResolvedLayer = {
    name: c.name,
    inFeatures: c.inFeatures,
    outFeatures: c.outFeatures,
    ...(c.projection ? { projection: c.projection } : {}),
    count: c.count,
    bits: pick('bits', c.chain).value,
    group: group.value,
    rank: c.hasAdapter ? rank.value : 0,
    alpha: pick('alpha', c.chain).value,
    dropout: pick('dropout', c.chain).value,
    pool: pick('pool', c.chain).value,
    dtype: pick('dtype', c.chain).value,
    scales: pick('scales', c.chain).value,
  };
  return { layer, group, rank };
}

function resolveShape(r: Reporter, def: ModelDef): ModelShape | undefined {
  if (!def.llama) {
    r.error(def.name?.loc ?? def.keyLoc, 'a model needs its shape: `llama { dim … hidden … layers … heads … vocab … context … }`', 'or write `spec NAME { layer … }` for standalone layers');
    return undefined;
  }
  const v = def.llama.values;
  const missing = REQUIRED_LLAMA_KEYS.filter((k) => v[k] === undefined);
  const unreported = missing.filter((k) => !def.llama!.suggested.has(k));
  if (unreported.length) {
    r.error(def.llama.loc, `\`llama\` is missing ${listWords(unreported.map((k) => `\`${k}\``))}`, unreported.map((k) => `${k}: ${LLAMA_KEYS[k]}`).join('; '));
  }
  if (Object.values(v).some((s) => s === null) || missing.length) return undefined;
  const num = (k: ShapeKey, dflt: number) => v[k]?.value ?? dflt;
  const shape: ModelShape = {
    dim: num('dim', 0), hidden: num('hidden', 0), layers: num('layers', 0), heads: num('heads', 0),
    kvHeads: num('kv_heads', num('heads', 0)), vocab: num('vocab', 0), context: num('context', 0),
    ropeTheta: num('rope_theta', DEFAULT_ROPE_THETA), normEps: num('norm_eps', DEFAULT_NORM_EPS),
  };
  let ok = true;
  if (shape.dim % shape.heads !== 0) {
    r.error(v.heads!.loc, `heads ${shape.heads} does not divide dim ${shape.dim}`, `head_dim = dim / heads must be whole; heads that divide ${shape.dim}: ${divisorList(shape.dim)}`);
    ok = false;
  } else if ((shape.dim / shape.heads) % 2 !== 0) {
    r.error(v.heads!.loc, `head_dim = dim / heads = ${shape.dim / shape.heads} is odd`, 'RoPE rotates pairs of dimensions, so head_dim must be even');
    ok = false;
  }
  if (shape.heads % shape.kvHeads !== 0) {
    r.error((v.kv_heads ?? v.heads)!.loc, `kv_heads ${shape.kvHeads} does not divide heads ${shape.heads}`, `each key/value head serves heads / kv_heads query heads; kv_heads that divide ${shape.heads}: ${divisorList(shape.heads)}`);
    ok = false;
  }
  return ok ? shape : undefined;
}

/** The tables' types; ggml's blocks hold 32 inputs, so a block type needs dim to be a multiple of 32. */
function resolveTables(r: Reporter, t: TablesDef, model: ModelShape): TableTypes | undefined {
  if (t.embedding === null || t.classifier === null) return undefined; // a bad type, already reported
  const tables: TableTypes = { embedding: t.embedding?.value ?? 'file', classifier: t.classifier?.value ?? 'file' };
  let ok = true;
  for (const which of ['embedding', 'classifier'] as const) {
    const s = t[which];
    if (!s || !s.value.startsWith('q') || model.dim % 32 === 0) continue;
    if (which === 'classifier' && t.embedding === s) continue; // `tables q8_0`: one setting, reported once
    r.error(s.loc, `${s.value} stores blocks of 32 values along each row, but the table's rows are dim = ${model.dim} long`, `a multiple of 32 is needed; use fp16, bf16 or fp32 for this model`);
    ok = false;
  }
  return ok ? tables : undefined;
}

function resolveTargets(acc: TargetsAcc | undefined): Targets {
  if (!acc) return { cpu: true, cuda: { archs: [...DEFAULT_CUDA_ARCHS] } };
  return { cpu: !!acc.cpu, cuda: acc.cuda ? { archs: acc.cuda.archs ?? [...DEFAULT_CUDA_ARCHS] } : null };
}

function divisorList(n: number): string {
  const d = divisors(n);
  return d.length <= 24 ? d.join(', ') : `${d.slice(0, 20).join(', ')}, … (${d.length} in all)`;
}

const locKey = (l: Loc | undefined) => (l ? `${l.file}:${l.line}:${l.col}` : 'default');

/** Groups layers by where a setting came from, so one bad `group 32` is one diagnostic however many layers it breaks. */
function byOrigin<T>(entries: { loc?: Loc; key: string; item: T }[]): Map<string, { loc?: Loc; items: T[] }> {
  const m = new Map<string, { loc?: Loc; items: T[] }>();
  for (const e of entries) {
    const k = `${locKey(e.loc)}|${e.key}`;
    if (!m.has(k)) m.set(k, { loc: e.loc, items: [] });
    m.get(k)!.items.push(e.item);
  }
  return m;
}

type ResolvedEntry = ReturnType<typeof resolveLayer>;

function checkGroups(r: Reporter, cands: Candidate[], layers: ResolvedEntry[], anchor: Loc, isModel: boolean): void {
  const bad = cands
    .map((c, i) => ({ c, l: layers[i] }))
    .filter(({ c, l }) => !l.group.tainted && c.inFeatures % l.group.value !== 0)
    .map(({ c, l }) => ({ loc: l.group.loc, key: `${l.group.value}|${c.inFeatures}`, item: { c, g: l.group.value } }));
  for (const { loc, items } of byOrigin(bad).values()) {
    const { g } = items[0];
    const n = items[0].c.inFeatures;
    const names = items.map((x) => x.c.name);
    const whose = isModel
      ? `${names.length === 1 ? `\`${names[0]}\`'s in_features` : `the in_features of ${listWords(names.map((x) => `\`${x}\``))}`} (${items[0].c.inKey} = ${n})`
      : `${names.length === 1 ? `layer \`${names[0]}\`'s` : `the`} in_features ${n}${names.length > 1 ? ` of ${listWords(names.map((x) => `\`${x}\``))}` : ''}`;
    const better = nearestDivisor(n, g);
    let hint = `groups that divide ${n}: ${divisorList(n)}`;
    // Set on the layer/projection itself: the divisors say it all. Inherited: say where to change it for these only.
    const ownSetting = loc !== undefined && items.every((x) => x.c.chain[0].group?.loc === loc);
    if (!ownSetting) hint += isModel ? `; e.g. \`override ${names.join(', ')} { group ${better} }\`` : `; e.g. \`group ${better}\` in \`layer ${names[0]}\``;
    r.error(loc ?? anchor, `${loc ? '' : 'the default '}group ${g} does not divide ${whose}`, hint);
  }
}

function checkRanks(r: Reporter, cands: Candidate[], layers: ResolvedEntry[], anchor: Loc): void {
  const over = cands
    .map((c, i) => ({ c, l: layers[i] }))
    .filter(({ c, l }) => !l.group.tainted && !l.rank.tainted && c.inFeatures % l.group.value === 0 && l.layer.rank > c.inFeatures / l.group.value)
    .map(({ c, l }) => ({ loc: l.rank.loc, key: String(l.layer.rank), item: { c, groups: c.inFeatures / l.group.value, g: l.group.value, rank: l.layer.rank } }));
  for (const { loc, items } of byOrigin(over).values()) {
    const rank = items[0].rank;
    // One clause per distinct in/group, e.g. "q, k, v, o, gate and up (64/32 = 2 groups)".
    const parts = new Map<string, string[]>();
    for (const x of items) {
      const k = `${x.c.inFeatures}/${x.g} = ${x.groups} group${x.groups === 1 ? '' : 's'}`;
      parts.set(k, [...(parts.get(k) ?? []), `\`${x.c.name}\``]);
    }
    const clauses = [...parts].map(([k, names]) => `${listWords(names)} (${k})`);
    const minGroups = Math.min(...items.map((x) => x.groups));
    r.warning(loc ?? anchor, `${loc ? '' : 'the default '}rank ${rank} exceeds in/group for ${listWords(clauses)}`,
      `A is [rank, in/group], so B·A has rank at most in/group: ranks above ${minGroups} add parameters but no capacity; lower the rank or the group`);
  }
}
