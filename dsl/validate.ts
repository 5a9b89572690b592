// Meaning: reads the AST of a whole compilation unit (a file with its includes expanded in place), checks
// every key and value, applies defaults (dsl/defaults.ts) and resolves the layers. Local problems (unknown
// key, bad value, duplicate) are always reported; whole-spec checks (missing keys, divisibility, rank) run
// only when the syntax was sound, because a recovered parse may have dropped the very key they would miss.
import type { AstItem, AstValue } from './ast.ts';
import type { Diagnostic, Loc } from './diagnostics.ts';
import { BITS, DTYPES, KNOWN_ARCHS, LLAMA_KEYS, MIN_CUDA_ARCH, POOLS, SCALE_DTYPES, TABLE_TYPES } from './defaults.ts';
import {
  Reporter, checkIdentifier, noBlock, noValues, readChoice, readItems, readNames, readNumber, type Setting,
} from './read.ts';
import { PROJECTIONS, type Projection, type QaloraSettings, type ResolvedSpec, type TableType } from './resolved.ts';
import { suggest, suggestionHint } from './suggest.ts';
import { resolve } from './resolve.ts';

export type QKey = keyof QaloraSettings;
export const QKEYS: readonly QKey[] = ['bits', 'group', 'rank', 'alpha', 'dropout', 'pool', 'dtype', 'scales'];
/** A key's setting; null when the key was given but its value was bad (already reported). */
export type Settings = { [K in QKey]?: Setting<QaloraSettings[K]> | null };

export interface TargetsAcc {
  cpu?: Loc;
  cuda?: { loc: Loc; archs?: string[] | null };
  /** Where the target list was written (first `target` key). */
  loc: Loc;
}

export interface Scope {
  qalora: Settings;
  adapters?: { set: Set<Projection>; loc: Loc } | null;
  targets?: TargetsAcc;
}

export type ShapeKey = keyof typeof LLAMA_KEYS;
export interface ModelDef {
  kind: 'model';
  keyLoc: Loc;
  name?: Setting<string> | null;
  /** `suggested`: keys an unknown key was taken for (`intermediate` → hidden): not reported missing again. */
  llama?: { loc: Loc; values: { [K in ShapeKey]?: Setting<number> | null }; suggested: Set<string> };
  scope: Scope;
  overrides: Map<Projection, { loc: Loc; settings: Settings }>;
  /** `tables X` (both) or `tables { embedding X  classifier Y }`; null entries were bad (already reported). */
  tables?: TablesDef;
}

export interface TablesDef {
  embedding?: Setting<TableType> | null;
  classifier?: Setting<TableType> | null;
}

export interface LayerDef {
  keyLoc: Loc;
  name?: Setting<string>;
  inFeatures?: Setting<number> | null;
  outFeatures?: Setting<number> | null;
  settings: Settings;
}

export interface SpecDef {
  kind: 'spec';
  keyLoc: Loc;
  name?: Setting<string> | null;
  scope: Scope;
  layers: LayerDef[];
}

const emptyScope = (): Scope => ({ qalora: {} });
const PROJECTION_WORDS = [...PROJECTIONS, 'all_linear', 'none'];

export function validate(items: readonly AstItem[], rootFile: string, syntaxOk: boolean): { spec?: ResolvedSpec; diagnostics: Diagnostic[] } {
  const r = new Reporter();
  const defaults = emptyScope();
  let def: ModelDef | SpecDef | undefined;
  let defLoc: Loc | undefined;

  const definition = (kind: 'model' | 'spec') => (item: AstItem) => {
    if (def && defLoc) {
      r.error(item.keyLoc, `a file defines one model or spec; \`${item.key}\` here is a second one`, 'put each in its own file; share settings through `include`', [
        { message: 'the first definition', ...defLoc },
      ]);
      return;
    }
    defLoc = item.keyLoc;
    def = kind === 'model' ? readModel(r, item) : readSpec(r, item);
  };

  readItems(r, items, 'at the top level of a file', {
    include: () => {}, // expanded by the loader before validation
    defaults: (item) => {
      noValues(r, item, 'defaults { … }');
      if (!item.block) return r.error(item.keyLoc, '`defaults` needs a `{ … }` block');
      const scope = readScope(r, item.block.items, 'in `defaults`', {});
      Object.assign(defaults.qalora, scope.qalora);
      if (scope.adapters !== undefined) defaults.adapters = scope.adapters;
      if (scope.targets !== undefined) defaults.targets = scope.targets;
    },
    model: definition('model'),
    spec: definition('spec'),
  }, {
    repeatable: ['include', 'defaults', 'model', 'spec'],
    label: "a file's top level",
    misplaced: {
      ...Object.fromEntries(['llama', 'qalora', 'adapters', 'override', 'target', 'layer', ...QKEYS].map((k) => [k, 'write it inside `model NAME { … }`, `spec NAME { … }` or `defaults { … }`'])),
      tables: 'write it inside `model NAME { … }`',
    },
  });

  let spec: ResolvedSpec | undefined;
  if (syntaxOk) {
    if (!def) {
      r.error({ file: rootFile, line: 1, col: 1, endCol: 2 }, 'no `model` or `spec` definition', 'a spec needs `model NAME { llama { … } }` or `spec NAME { layer NAME { in N out M } }`');
    } else {
      spec = resolve(r, def, defaults, rootFile);
    }
  }
  const failed = r.diagnostics.some((d) => d.severity === 'error');
  return { spec: failed ? undefined : spec, diagnostics: r.diagnostics };
}

// ---- reading ------------------------------------------------------------------------------------------------

function readName(r: Reporter, item: AstItem, what: string): Setting<string> | null | undefined {
  if (item.values.length === 0) return undefined;
  if (item.values.length > 1) r.error(item.values[1].loc, `\`${item.key}\` takes one name`, 'lists are not allowed here');
  const v = item.values[0];
  const name = checkIdentifier(r, v, what);
  return name === undefined ? null : { value: name, loc: v.loc };
}

function readModel(r: Reporter, item: AstItem): ModelDef {
  const def: ModelDef = { kind: 'model', keyLoc: item.keyLoc, name: readName(r, item, 'model name'), scope: emptyScope(), overrides: new Map() };
  if (!item.block) {
    r.error(item.keyLoc, '`model` needs a `{ … }` block');
    return def;
  }
  const where = `in \`model${def.name ? ' ' + def.name.value : ''}\``;
  def.scope = readScope(r, item.block.items, where, {
    llama: (it) => {
      noValues(r, it, 'llama { dim … }');
      if (!it.block) return r.error(it.keyLoc, '`llama` needs a `{ … }` block with the model shape');
      const values: NonNullable<ModelDef['llama']>['values'] = {};
      const handlers = Object.fromEntries(Object.keys(LLAMA_KEYS).map((k) => [k, (x: AstItem) => {
        const real = k === 'rope_theta' || k === 'norm_eps';
        values[k as ShapeKey] = readNumber(r, x, real ? { minExclusive: 0, expects: LLAMA_KEYS[k] } : { integer: true, min: 1, expects: LLAMA_KEYS[k] }) ?? null;
      }]));
      const suggested = readItems(r, it.block.items, 'in `llama`', handlers, { misplaced: qaloraKeysMisplaced('llama') });
      def.llama = { loc: it.keyLoc, values, suggested };
    },
    override: (it) => {
      const names = readNames(r, it, 'projection names (q, k, v, o, gate, up, down)');
      if (!it.block) r.error(it.keyLoc, '`override` needs a `{ … }` block of settings', 'e.g. `override down { group 43 }`');
      const settings = it.block ? readSettings(r, it.block.items, `in \`override ${names.map((n) => n.value).join(', ')}\``, {}) : {};
      for (const n of names) {
        if (!(PROJECTIONS as readonly string[]).includes(n.value)) {
          r.error(n.loc, `\`${n.value}\` is not a projection`, suggestionHint(n.value, PROJECTIONS, 'projections are'));
          continue;
        }
        const p = n.value as Projection;
        const prev = def.overrides.get(p);
        if (prev) r.duplicate(`override of \`${p}\``, n.loc, prev.loc);
        else def.overrides.set(p, { loc: n.loc, settings });
      }
    },
    tables: (it) => (def.tables = readTables(r, it)),
  }, { layer: 'standalone layers go in `spec NAME { … }`; a model\'s layers come from its `llama` shape' });
  return def;
}

function readSpec(r: Reporter, item: AstItem): SpecDef {
  const def: SpecDef = { kind: 'spec', keyLoc: item.keyLoc, name: readName(r, item, 'spec name'), scope: emptyScope(), layers: [] };
  if (!item.block) {
    r.error(item.keyLoc, '`spec` needs a `{ … }` block');
    return def;
  }
  const firstByName = new Map<string, Loc>();
  def.scope = readScope(r, item.block.items, `in \`spec${def.name ? ' ' + def.name.value : ''}\``, {
    layer: (it) => {
      const layer: LayerDef = { keyLoc: it.keyLoc, settings: {} };
      const name = readName(r, it, 'layer name');
      if (name === undefined) r.error(it.keyLoc, '`layer` needs a name', 'e.g. `layer proj { in 4096 out 11008 }`');
      if (name) {
        const prev = firstByName.get(name.value);
        if (prev) r.duplicate(`layer \`${name.value}\``, name.loc, prev);
        else firstByName.set(name.value, name.loc);
        layer.name = name;
      }
      if (!it.block) {
        r.error(it.keyLoc, '`layer` needs a `{ … }` block with `in` and `out`');
        return;
      }
      const where = `in \`layer${name ? ' ' + name.value : ''}\``;
      layer.settings = readSettings(r, it.block.items, where, {
        in: (x) => (layer.inFeatures = readNumber(r, x, { integer: true, min: 1, expects: 'input features' }) ?? null),
        out: (x) => (layer.outFeatures = readNumber(r, x, { integer: true, min: 1, expects: 'output features' }) ?? null),
      });
      if (!name) return; // reported; keep it out of the resolved layers
      def.layers.push(layer);
    },
  }, {
    llama: 'a `llama` shape makes a model: write `model NAME { llama { … } }` instead of `spec`',
    adapters: '`adapters` picks projections of a model; in a spec, give a layer `rank 0` to leave it without an adapter',
    override: '`override` adjusts projections of a model; in a spec, put settings in the `layer` block itself',
  }, ['layer'], ['adapters']);
  return def;
}

function readTables(r: Reporter, item: AstItem): TablesDef {
  const def: TablesDef = {};
  const types = `one of ${TABLE_TYPES.join(', ')}`;
  if (item.values.length > 0) {
    if (item.block) r.error(item.block.open, '`tables` takes one type for both tables or a `{ … }` block, not both', 'e.g. `tables fp16` or `tables { embedding q8_0  classifier fp16 }`');
    def.embedding = def.classifier = readChoice(r, { ...item, block: undefined }, TABLE_TYPES, 'table type') ?? null;
    return def;
  }
  if (!item.block) {
    r.error(item.keyLoc, `\`tables\` needs a type (${types}) or a \`{ … }\` block`, 'e.g. `tables fp16` or `tables { embedding q8_0  classifier fp16 }`');
    return def;
  }
  readItems(r, item.block.items, 'in `tables`', {
    embedding: (x) => (def.embedding = readChoice(r, x, TABLE_TYPES, 'table type') ?? null),
    classifier: (x) => (def.classifier = readChoice(r, x, TABLE_TYPES, 'table type') ?? null),
  });
  return def;
}

function qaloraKeysMisplaced(where: string): Record<string, string> {
  return Object.fromEntries(QKEYS.map((k) => [k, `QA-LoRA settings go in \`qalora { … }\`, not in \`${where}\``]));
}

/** The items a model, spec or defaults block shares: qalora, adapters, target, plus the caller's own. */
function readScope(
  r: Reporter,
  items: readonly AstItem[],
  where: string,
  extra: Record<string, (item: AstItem) => void>,
  misplaced: Record<string, string> = {},
  repeatableExtra: string[] = [],
  omit: string[] = [],
): Scope {
  const scope = emptyScope();
  const targetItems: AstItem[] = [];
  const handlers: Record<string, (item: AstItem) => void> = {
    qalora: (it) => {
      noValues(r, it, 'qalora { bits 4 … }');
      if (!it.block) return r.error(it.keyLoc, '`qalora` needs a `{ … }` block of settings');
      scope.qalora = readSettings(r, it.block.items, 'in `qalora`', {});
    },
    adapters: (it) => {
      noBlock(r, it);
      scope.adapters = readAdapters(r, it);
    },
    target: (it) => targetItems.push(it),
    ...extra,
  };
  for (const k of omit) delete handlers[k];
  const belongsTo: Record<string, string> = {
    llama: 'a shape belongs to one model: put it in `model NAME { … }`',
    override: 'overrides adjust projections of one model: put them in `model NAME { … }`',
    tables: 'token tables belong to a model: put `tables` in `model NAME { … }`',
    layer: 'standalone layers belong in `spec NAME { … }`',
  };
  const notHere = Object.fromEntries(Object.entries(belongsTo).filter(([k]) => !(k in handlers)));
  readItems(r, items, where, handlers, {
    repeatable: ['target', 'override', ...repeatableExtra],
    misplaced: { ...notHere, ...qaloraKeysMisplaced(where.replace(/^in `|`$/g, '')), ...misplaced, include: '`include` is only allowed at the top level of a file' },
  });
  if (targetItems.length > 0) scope.targets = readTargets(r, targetItems);
  return scope;
}

function readSettings(r: Reporter, items: readonly AstItem[], where: string, extra: Record<string, (item: AstItem) => void>): Settings {
  const s: Settings = {};
  readItems(r, items, where, {
    bits: (it) => (s.bits = readChoice(r, it, BITS, 'bits') ?? null),
    group: (it) => (s.group = readNumber(r, it, { integer: true, min: 1, expects: 'inputs per quantization group' }) ?? null),
    rank: (it) => (s.rank = readNumber(r, it, { integer: true, min: 0, expects: 'adapter rank; 0 for no adapter' }) ?? null),
    alpha: (it) => (s.alpha = readNumber(r, it, { minExclusive: 0, expects: 'LoRA alpha; scale = alpha / rank' }) ?? null),
    dropout: (it) => (s.dropout = readDropout(r, it)),
    pool: (it) => (s.pool = readChoice(r, it, POOLS, 'pooling') ?? null),
    dtype: (it) => (s.dtype = readChoice(r, it, DTYPES, 'activation dtype') ?? null),
    scales: (it) => (s.scales = readChoice(r, it, SCALE_DTYPES, 'scale dtype') ?? null),
    ...extra,
  }, { misplaced: { include: '`include` is only allowed at the top level of a file' } });
  return s;
}

function readDropout(r: Reporter, item: AstItem): Setting<number> | null {
  const s = readNumber(r, item, { expects: 'a probability in [0, 1)' });
  if (!s) return null;
  if (s.value < 0 || s.value >= 1) {
    r.error(s.loc, `dropout must be in [0, 1), got ${s.value}`, 'dropout is the probability of zeroing a pooled input: 0 disables it, 0.05 is the paper\'s value');
    return null;
  }
  return s;
}

function readAdapters(r: Reporter, item: AstItem): Scope['adapters'] {
  const names = readNames(r, item, 'projection names (q, k, v, o, gate, up, down), `all_linear` or `none`');
  const set = new Set<Projection>();
  let ok = names.length > 0;
  const seen = new Map<string, Loc>();
  for (const n of names) {
    if (!PROJECTION_WORDS.includes(n.value)) {
      r.error(n.loc, `\`${n.value}\` is not a projection`, suggestionHint(n.value, PROJECTION_WORDS, 'adapters takes'));
      ok = false;
      continue;
    }
    const prev = seen.get(n.value);
    if (prev) r.warning(n.loc, `\`${n.value}\` is listed twice`, undefined, [{ message: 'first listed here', ...prev }]);
    seen.set(n.value, n.loc);
    if (n.value === 'all_linear') PROJECTIONS.forEach((p) => set.add(p));
    else if (n.value !== 'none') set.add(n.value as Projection);
  }
  if (names.length > 1 && (seen.has('all_linear') || seen.has('none'))) {
    const word = seen.has('none') ? 'none' : 'all_linear';
    r.error(seen.get(word)!, `\`${word}\` cannot be combined with other projections`, word === 'none' ? 'write `adapters none` alone' : '`all_linear` already means all seven projections');
    ok = false;
  }
  return ok ? { set, loc: item.keyLoc } : null;
}

function readTargets(r: Reporter, items: readonly AstItem[]): TargetsAcc {
  const acc: TargetsAcc = { loc: items[0].keyLoc };
  for (const it of items) {
    const v = it.values[0];
    if (!v) {
      r.error(it.keyLoc, '`target` needs a value: `cpu` or `cuda`');
      continue;
    }
    if (it.values.length > 1) r.error(it.values[1].loc, '`target` takes one value', 'write one `target` line per target');
    if (v.text !== 'cpu' && v.text !== 'cuda') {
      r.error(v.loc, `unknown target \`${v.text}\``, suggestionHint(v.text, ['cpu', 'cuda'], 'targets are'));
      continue;
    }
    const prev = v.text === 'cpu' ? acc.cpu : acc.cuda?.loc;
    if (prev) {
      r.duplicate(`target \`${v.text}\``, v.loc, prev);
      continue;
    }
    if (v.text === 'cpu') {
      acc.cpu = v.loc;
      if (it.block && it.block.items.length > 0) r.error(it.block.items[0].keyLoc, '`target cpu` takes no settings', 'the CPU kernels are tuned by the compiler');
      continue;
    }
    const cuda: NonNullable<TargetsAcc['cuda']> = { loc: v.loc };
    acc.cuda = cuda;
    if (it.block) readItems(r, it.block.items, 'in `target cuda`', { archs: (x) => (cuda.archs = readArchs(r, x)) });
  }
  return acc;
}

function readArchs(r: Reporter, item: AstItem): string[] | null {
  noBlock(r, item);
  const names = readNames(r, item, 'CUDA archs such as sm_80, sm_90', (v: AstValue) => (v.kind === 'number' ? `write \`sm_${v.text.replace('.', '')}\`` : undefined));
  let ok = names.length === item.values.length && names.length > 0;
  const seen = new Map<string, Loc>();
  for (const n of names) {
    // sm_XY / sm_XYa from MIN_CUDA_ARCH on is accepted (a newer toolkit may know archs this list does not);
    // older archs and anything else are errors, reported here rather than by ptxas at build time.
    const m = /^sm_(\d+)(a?)$/.exec(n.value);
    const known = `known archs: ${KNOWN_ARCHS.join(', ')}`;
    if (!m) {
      const compute = /^compute_(\d+a?)$/.exec(n.value);
      const guess = compute ? `sm_${compute[1]}` : suggest(n.value, KNOWN_ARCHS);
      r.error(n.loc, `\`${n.value}\` is not a CUDA arch`, guess ? `did you mean \`${guess}\`? (${known})` : `archs are written sm_XY or sm_XYa; ${known}`);
      ok = false;
    } else if (Number(m[1]) < MIN_CUDA_ARCH) {
      r.error(
        n.loc,
        `qalora's CUDA kernels cannot be built for ${n.value}: they use cp.async and mma.sync m16n8k16, which need sm_${MIN_CUDA_ARCH} or newer`,
        `ptxas rejects those instructions below sm_${MIN_CUDA_ARCH}; ${known}`,
      );
      ok = false;
    } else if (!KNOWN_ARCHS.includes(n.value)) {
      const guess = suggest(n.value, KNOWN_ARCHS);
      r.warning(n.loc, `unknown CUDA arch ${n.value}: nvcc may reject it`, `${guess ? `did you mean \`${guess}\`? ` : ''}(${known})`);
    }
    const prev = seen.get(n.value);
    if (prev) r.warning(n.loc, `${n.value} is listed twice`, undefined, [{ message: 'first listed here', ...prev }]);
    seen.set(n.value, n.loc);
  }
  return ok ? [...seen.keys()] : null;
}
