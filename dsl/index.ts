// The DSL's entry points: parse a spec from text or load it from a file (with its includes), and format the
// diagnostics. Neither throws on bad input: every problem comes back as a Diagnostic.
import { readFileSync } from 'node:fs';
import { dirname, join, normalize, isAbsolute } from 'node:path';
import type { AstItem } from './ast.ts';
import { type Diagnostic, hasErrors, sortDiagnostics } from './diagnostics.ts';
import type { ResolvedSpec } from './resolved.ts';
import { validate } from './validate.ts';
import { buildAst } from './visitor.ts';

export { formatDiagnostics, summarize, type Diagnostic } from './diagnostics.ts';
export type { ResolvedSpec, ResolvedLayer } from './resolved.ts';

export interface SpecResult {
  /** Undefined exactly when there is an error. */
  spec?: ResolvedSpec;
  diagnostics: Diagnostic[];
  /** Every file read, by the name diagnostics use, with its text (for formatDiagnostics). */
  sources: Map<string, string>;
}

/** How files are read; tests substitute an in-memory one. Throws (any error) when a file cannot be read. */
export type ReadFile = (path: string) => string;
const readFromDisk: ReadFile = (p) => readFileSync(p, 'utf8');

/** Parses a spec given as text. Includes are read from disk, relative to `file`. */
export function parseSpec(text: string, file: string, readFile: ReadFile = readFromDisk): SpecResult {
  return compileUnit(file, text, readFile);
}

/** Reads a spec file and everything it includes. */
export function loadSpec(path: string, readFile: ReadFile = readFromDisk): SpecResult {
  let text: string;
  try {
    text = readFile(path);
  } catch (e) {
    const sources = new Map([[path, '']]);
    return { diagnostics: [{ severity: 'error', message: `cannot read ${path}: ${(e as Error).message}`, file: path, line: 1, col: 1 }], sources };
  }
  return compileUnit(path, text, readFile);
}

function compileUnit(rootFile: string, rootText: string, readFile: ReadFile): SpecResult {
  const sources = new Map<string, string>();
  const diagnostics: Diagnostic[] = [];
  let syntaxOk = true;

  // Depth-first, each include's items taking the include's place; `stack` holds the chain being read
  // (a file on it again is a cycle), `done` the files already expanded (included once, like #pragma once).
  const done = new Set<string>();
  const expand = (file: string, text: string, stack: string[]): AstItem[] => {
    sources.set(file, text);
    done.add(file);
    const { doc, diagnostics: syntax } = buildAst(text, file);
    if (syntax.some((d) => d.severity === 'error')) syntaxOk = false;
    diagnostics.push(...syntax);
    const out: AstItem[] = [];
    for (const item of doc.items) {
      if (item.key !== 'include') {
        out.push(item);
        continue;
      }
      const target = includeTarget(item, diagnostics);
      if (target === undefined) {
        syntaxOk = false;
        continue;
      }
      const path = isAbsolute(target) ? normalize(target) : join(dirname(file), target);
      if (stack.includes(path) || path === file) {
        const chain = [...stack, file, path].slice([...stack, file].indexOf(path));
        diagnostics.push({ severity: 'error', message: `include cycle: ${chain.join(' → ')}`, ...item.values[0].loc, hint: 'a file cannot include itself, directly or through other files' });
        syntaxOk = false;
        continue;
      }
      if (done.has(path)) continue;
      let included: string;
      try {
        included = readFile(path);
      } catch (e) {
        const reason = (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (e as Error).message;
        diagnostics.push({ severity: 'error', message: `cannot include "${target}": ${reason} (${path})`, ...item.values[0].loc, hint: 'include paths are relative to the file that includes them' });
        syntaxOk = false;
        continue;
      }
      out.push(...expand(path, included, [...stack, file]));
    }
    return out;
  };

  const items = expand(rootFile, rootText, []);
  const result = validate(items, rootFile, syntaxOk);
  diagnostics.push(...result.diagnostics);
  const sorted = sortDiagnostics(diagnostics, [...sources.keys()]);
  return { spec: hasErrors(sorted) ? undefined : result.spec, diagnostics: sorted, sources };
}

function includeTarget(item: AstItem, diagnostics: Diagnostic[]): string | undefined {
  const v = item.values[0];
  const bad = (message: string, at = item.keyLoc) => {
    const file = v?.kind === 'name' ? v.text : 'other.qal';
    diagnostics.push({ severity: 'error', message, ...at, hint: `write \`include "${file}"\`` });
    return undefined;
  };
  if (item.block) return bad('`include` takes no `{ … }` block', item.block.open);
  if (!v) return bad('`include` needs a file name in double quotes');
  if (item.values.length > 1) return bad('`include` takes one file name', item.values[1].loc);
  if (v.kind === 'bad-string') return bad('this string has no closing quote', v.loc);
  if (v.kind !== 'string') return bad(`\`include\` needs a file name in double quotes, got \`${v.text}\``, v.loc);
  if (v.text.trim() === '') return bad('`include` needs a non-empty file name', v.loc);
  return v.text;
}
