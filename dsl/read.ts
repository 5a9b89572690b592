// Reading the generic AST into typed values, one key at a time, with a diagnostic at the exact token for
// anything wrong. Readers return undefined for a bad value; callers then fall back quietly (the error is
// already reported) so that one mistake does not cascade into several.
import type { AstItem, AstValue } from './ast.ts';
import type { Diagnostic, Loc, RelatedLocation } from './diagnostics.ts';
import { suggest, suggestionHint } from './suggest.ts';

export interface Setting<T> {
  value: T;
  loc: Loc;
}

export class Reporter {
  readonly diagnostics: Diagnostic[] = [];

  error(loc: Loc, message: string, hint?: string, related?: RelatedLocation[]): void {
    this.diagnostics.push({ severity: 'error', message, ...loc, hint, related });
  }

  warning(loc: Loc, message: string, hint?: string, related?: RelatedLocation[]): void {
    this.diagnostics.push({ severity: 'warning', message, ...loc, hint, related });
  }

  duplicate(what: string, again: Loc, first: Loc): void {
    this.error(again, `duplicate ${what}`, undefined, [{ message: 'first defined here', ...first }]);
  }
}

export interface BlockHandler {
  (item: AstItem): void;
}

/**
 * Dispatches a block's items to their handlers: unknown keys get a did-you-mean, keys not in `repeatable`
 * may appear once (a second one is reported with both places). `misplaced` maps keys that are valid
 * elsewhere to a sentence saying where they belong. Returns the keys suggested for unknown ones, so that a
 * caller need not also report them as missing.
 */
export function readItems(
  r: Reporter,
  items: readonly AstItem[],
  where: string,
  handlers: Record<string, BlockHandler>,
  options: { repeatable?: readonly string[]; misplaced?: Record<string, string>; label?: string } = {},
): Set<string> {
  const suggested = new Set<string>();
  const first = new Map<string, Loc>();
  const keys = Object.keys(handlers);
  for (const item of items) {
    const handler = Object.hasOwn(handlers, item.key) ? handlers[item.key] : undefined;
    if (!handler) {
      const misplaced = options.misplaced && Object.hasOwn(options.misplaced, item.key) ? options.misplaced[item.key] : undefined;
      if (misplaced) r.error(item.keyLoc, `\`${item.key}\` does not belong ${where}`, misplaced);
      else {
        const guess = suggest(item.key, keys);
        if (guess) suggested.add(guess);
        r.error(item.keyLoc, `unknown key \`${item.key}\` ${where}`, suggestionHint(item.key, keys, `${options.label ?? where.replace(/^in /, '')} takes`));
      }
      continue;
    }
    if (!options.repeatable?.includes(item.key)) {
      const prev = first.get(item.key);
      if (prev) {
        r.duplicate(`\`${item.key}\` ${where}`, item.keyLoc, prev);
        continue;
      }
      first.set(item.key, item.keyLoc);
    }
    handler(item);
  }
  return suggested;
}

function describeValue(v: AstValue): string {
  if (v.kind === 'string' || v.kind === 'bad-string') return `the string "${v.text}"`;
  return `\`${v.text}\``;
}

/** The item's single value; reports a missing value, extra values and an unexpected block. */
export function singleValue(r: Reporter, item: AstItem, expects: string): AstValue | undefined {
  noBlock(r, item);
  if (item.values.length === 0) {
    r.error(item.keyLoc, `\`${item.key}\` needs a value (${expects})`);
    return undefined;
  }
  if (item.values.length > 1) {
    r.error(item.values[1].loc, `\`${item.key}\` takes one value, got ${item.values.length}`);
  }
  const v = item.values[0];
  if (v.kind === 'bad-number') {
    r.error(v.loc, `\`${v.text}\` is not a number`, 'numbers are written like 64, 0.05 or 1e-5, without units');
    return undefined;
  }
  if (v.kind === 'bad-string') {
    r.error(v.loc, 'this string has no closing quote');
    return undefined;
  }
  return v;
}

export function noBlock(r: Reporter, item: AstItem): void {
  if (item.block) r.error(item.block.open, `\`${item.key}\` takes no \`{ … }\` block`);
}

export function noValues(r: Reporter, item: AstItem, usage: string): void {
  if (item.values.length > 0) r.error(item.values[0].loc, `\`${item.key}\` takes no value here`, `write \`${usage}\``);
}

/** Sizes reach C kernels as 32-bit counts; nothing real comes close. */
const MAX_INT = 2 ** 31 - 1;

export function readNumber(
  r: Reporter,
  item: AstItem,
  rule: { integer?: boolean; min?: number; minExclusive?: number; maxExclusive?: number; expects: string },
): Setting<number> | undefined {
  const v = singleValue(r, item, rule.expects);
  if (!v) return undefined;
  if (v.kind !== 'number' || v.number === undefined) {
    const looksLikeKey = v.kind === 'name' && /^[a-z_]+$/.test(v.text);
    r.error(v.loc, `\`${item.key}\` needs a number (${rule.expects}), got ${describeValue(v)}`,
      looksLikeKey ? `is the value of \`${item.key}\` missing?` : undefined);
    return undefined;
  }
  const n = v.number;
  if (rule.integer && Number.isInteger(n) && Math.abs(n) > MAX_INT) {
    r.error(v.loc, `\`${item.key}\` is too large: ${v.text} (at most ${MAX_INT})`);
    return undefined;
  }
  if (rule.integer && !Number.isInteger(n)) {
    r.error(v.loc, `\`${item.key}\` must be a whole number, got ${v.text}`);
    return undefined;
  }
  if (rule.min !== undefined && n < rule.min) {
    r.error(v.loc, `\`${item.key}\` must be at least ${rule.min}, got ${v.text}`);
    return undefined;
  }
  if (rule.minExclusive !== undefined && n <= rule.minExclusive) {
    r.error(v.loc, `\`${item.key}\` must be greater than ${rule.minExclusive}, got ${v.text}`);
    return undefined;
  }
  if (rule.maxExclusive !== undefined && n >= rule.maxExclusive) {
    r.error(v.loc, `\`${item.key}\` must be less than ${rule.maxExclusive}, got ${v.text}`);
    return undefined;
  }
  return { value: n, loc: v.loc };
}

export function readChoice<T extends string | number>(r: Reporter, item: AstItem, choices: readonly T[], what: string): Setting<T> | undefined {
  const expects = choices.join(', ');
  const v = singleValue(r, item, `one of ${expects}`);
  if (!v) return undefined;
  const found = choices.find((c) => String(c) === v.text);
  if (found === undefined) {
    const numeric = typeof choices[0] === 'number';
    r.error(v.loc, `${what} ${v.kind === 'number' ? v.text : describeValue(v)} is not supported`, numeric ? `${item.key} must be one of ${expects}` : suggestionHint(v.text, choices.map(String), `${item.key} is one of`));
    return undefined;
  }
  return { value: found, loc: v.loc };
}

/** A comma-separated list of names (adapters, archs, override targets). Numbers and strings are reported. */
export function readNames(r: Reporter, item: AstItem, expects: string, hintFor?: (v: AstValue) => string | undefined): Setting<string>[] {
  if (item.values.length === 0) {
    r.error(item.keyLoc, `\`${item.key}\` needs ${expects}`);
    return [];
  }
  const out: Setting<string>[] = [];
  for (const v of item.values) {
    if (v.kind !== 'name') {
      r.error(v.loc, `\`${item.key}\` expects ${expects}, got ${describeValue(v)}`, hintFor?.(v));
      continue;
    }
    out.push({ value: v.text, loc: v.loc });
  }
  return out;
}

/** A C identifier: spec and layer names become directory, module and symbol names downstream. */
export function checkIdentifier(r: Reporter, v: AstValue, what: string): string | undefined {
  if (v.kind === 'name' && /^[A-Za-z_][A-Za-z0-9_]*$/.test(v.text)) return v.text;
  const fixed = toIdentifier(v.text);
  r.error(v.loc, `${what} ${describeValue(v)} is not a valid name`, `names use letters, digits and _ (they become C and file names): try \`${fixed}\``);
  return undefined;
}

export function toIdentifier(text: string): string {
  const s = text.replace(/[^A-Za-z0-9_]/g, '_');
  return /^[A-Za-z_]/.test(s) ? s : `_${s}`;
}

/** "q, k and v" */
export function listWords(words: readonly string[]): string {
  return words.length <= 1 ? (words[0] ?? '') : `${words.slice(0, -1).join(', ')} and ${words.at(-1)}`;
}
