// Diagnostics: what the DSL reports, and how it prints them (compiler style: place, message, the source line
// with a caret/tilde under the offending text, then a hint). Columns are 1-based; endCol is exclusive.

export type Severity = 'error' | 'warning';

/** A second place a diagnostic refers to, e.g. the first definition of a duplicate. */
export interface RelatedLocation {
  message: string;
  file: string;
  line: number;
  col: number;
  endCol?: number;
}

export interface Diagnostic {
  severity: Severity;
  message: string;
  file: string;
  line: number;
  col: number;
  /** Exclusive end column on the same line; absent: a single caret. */
  endCol?: number;
  hint?: string;
  related?: RelatedLocation[];
}

/** A place in a source: where a token starts and (exclusively) ends on its line. */
export interface Loc {
  file: string;
  line: number;
  col: number;
  endCol: number;
}

export function hasErrors(diags: readonly Diagnostic[]): boolean {
  return diags.some((d) => d.severity === 'error');
}

/** Source order within a file; files in the order they were first read (the order of `sources`). */
export function sortDiagnostics(diags: Diagnostic[], fileOrder: readonly string[]): Diagnostic[] {
  const rank = (f: string) => {
    const i = fileOrder.indexOf(f);
    return i < 0 ? fileOrder.length : i;
  };
  return diags
    .map((d, i) => ({ d, i }))
    .sort((a, b) => rank(a.d.file) - rank(b.d.file) || a.d.line - b.d.line || a.d.col - b.d.col || a.i - b.i)
    .map((x) => x.d);
}

const MAX_SHOWN = 160;
const CONTEXT = 60;

export function formatDiagnostics(diags: readonly Diagnostic[], sources: ReadonlyMap<string, string>): string {
  const lineCache = new Map<string, string[]>();
  const linesOf = (file: string) => {
    let lines = lineCache.get(file);
    if (!lines) {
      lines = (sources.get(file) ?? '').split('\n').map((l) => l.replace(/\r$/, ''));
      lineCache.set(file, lines);
    }
    return lines;
  };
  const out: string[] = [];
  const place = (kind: string, message: string, at: RelatedLocation | Diagnostic) => {
    out.push(`${at.file}:${at.line}:${at.col}: ${kind}: ${message}`);
    const full = linesOf(at.file)[at.line - 1];
    if (full === undefined) return;
    const gutter = String(at.line);
    const pad = ' '.repeat(gutter.length);
    const fullWidth = Math.max(1, Math.min(at.endCol ?? at.col + 1, full.length + 1) - at.col);
    // A very long line is shown as a window around the offending text.
    const start = full.length > MAX_SHOWN ? Math.max(0, Math.min(at.col - 1 - CONTEXT, full.length - MAX_SHOWN)) : 0;
    const end = Math.min(full.length, start + MAX_SHOWN);
    const text = (start > 0 ? '…' : '') + full.slice(start, end) + (end < full.length ? '…' : '');
    const col = at.col - start + (start > 0 ? 1 : 0);
    const width = Math.max(1, Math.min(fullWidth, text.length + 1 - col));
    out.push(` ${gutter} | ${text}`);
    // Keep tabs so the caret lines up with the text above it however the terminal renders tabs.
    const lead = text.slice(0, Math.max(0, col - 1)).replace(/[^\t]/g, ' ');
    out.push(` ${pad} | ${lead}^${'~'.repeat(width - 1)}`);
  };
  for (const d of diags) {
    place(d.severity, d.message, d);
    for (const r of d.related ?? []) place('note', r.message, r);
    if (d.hint) out.push(`  hint: ${d.hint}`);
  }
  return out.length ? out.join('\n') + '\n' : '';
}

/** "2 errors, 1 warning" — for a summary line under formatted diagnostics. */
export function summarize(diags: readonly Diagnostic[]): string {
  const e = diags.filter((d) => d.severity === 'error').length;
  const w = diags.length - e;
  return `${e} error${e === 1 ? '' : 's'}, ${w} warning${w === 1 ? '' : 's'}`;
}
