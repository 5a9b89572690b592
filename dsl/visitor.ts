// CST → AST, plus the syntax diagnostics: lexer errors, tokens the grammar set aside as stray, and the
// parser's recognition errors (after chevrotain's recovery, so there may be several).
import type { CstNode, IToken } from 'chevrotain';
import type { AstBlock, AstDocument, AstItem, AstValue } from './ast.ts';
import type { Diagnostic, Loc } from './diagnostics.ts';
import { LCurly, RCurly } from './lexer.ts';
import { MAX_DEPTH, qalParser, parseText } from './parser.ts';

const BaseVisitor = qalParser.getBaseCstVisitorConstructor();

function isReal(t: IToken | undefined): t is IToken {
  return !!t && !t.isInsertedInRecovery && Number.isFinite(t.startOffset) && t.tokenType.name !== 'EOF';
}

function describe(t: IToken): string {
  switch (t.tokenType.name) {
    case 'NumberLiteral': return `number ${t.image}`;
    case 'StringLiteral': return `string ${t.image}`;
    case 'Identifier': return `\`${t.image}\``;
    default: return `'${t.image}'`;
  }
}

function locOf(t: IToken, file: string): Loc {
  return { file, line: t.startLine ?? 1, col: t.startColumn ?? 1, endCol: (t.endColumn ?? t.startColumn ?? 1) + 1 };
}

class AstBuilder extends BaseVisitor {
  constructor(readonly file: string, readonly diagnostics: Diagnostic[]) {
    super();
    this.validateVisitor();
  }

  loc(t: IToken): Loc {
    return locOf(t, this.file);
  }

  private strays(tokens: IToken[] | undefined, where: 'top' | 'block'): void {
    for (const t of (tokens ?? []).filter(isReal)) {
      const loc = this.loc(t);
      let message = `unexpected ${describe(t)}`;
      let hint: string | undefined;
      if (t.image === '}') {
        message = "unexpected '}': no block is open here";
        hint = "check that every '{' and '}' pair up";
      } else if (t.image === '{') {
        message = "unexpected '{': a block must follow a key, as in `llama { … }`";
      } else if (t.image === ',') {
        hint = 'commas separate the values of one key, as in `archs sm_80, sm_90`';
      } else {
        message = `unexpected ${describe(t)}: expected a key`;
        hint = where === 'top'
          ? 'a file holds `include "file.qal"`, `defaults { … }` and one `model NAME { … }` or `spec NAME { … }`'
          : 'each setting is `key value`; a key takes one value unless the values are separated by commas';
      }
      this.diagnostics.push({ severity: 'error', message, ...loc, hint });
    }
  }

  document(ctx: { item?: CstNode[]; stray?: IToken[] }): AstItem[] {
    this.strays(ctx.stray, 'top');
    return (ctx.item ?? []).map((n) => this.visit(n) as AstItem | undefined).filter((i): i is AstItem => !!i);
  }

  item(ctx: { key?: IToken[]; value?: CstNode[]; block?: CstNode[] }): AstItem | undefined {
    const key = ctx.key?.[0];
    if (!isReal(key)) return undefined;
    const values = (ctx.value ?? []).map((n) => this.visit(n) as AstValue | undefined).filter((v): v is AstValue => !!v);
    const block = ctx.block?.[0] ? (this.visit(ctx.block[0]) as AstBlock | undefined) : undefined;
    return { key: key.image, keyLoc: this.loc(key), values, block };
  }

  block(ctx: { LCurly?: IToken[]; RCurly?: IToken[]; item?: CstNode[]; stray?: IToken[] }): AstBlock | undefined {
    const open = ctx.LCurly?.[0];
    if (!isReal(open)) return undefined;
    this.strays(ctx.stray, 'block');
    const close = ctx.RCurly?.[0];
    const items = (ctx.item ?? []).map((n) => this.visit(n) as AstItem | undefined).filter((i): i is AstItem => !!i);
    return { open: this.loc(open), close: isReal(close) ? this.loc(close) : undefined, items };
  }

  value(ctx: { Identifier?: IToken[]; NumberLiteral?: IToken[]; StringLiteral?: IToken[] }): AstValue | undefined {
    const t = ctx.Identifier?.[0] ?? ctx.NumberLiteral?.[0] ?? ctx.StringLiteral?.[0];
    if (!isReal(t)) return undefined;
    const loc = this.loc(t);
    if (ctx.Identifier) return { kind: 'name', text: t.image, loc };
    if (ctx.StringLiteral) {
      const closed = t.image.length >= 2 && t.image.endsWith('"');
      return { kind: closed ? 'string' : 'bad-string', text: t.image.slice(1, closed ? -1 : undefined), loc };
    }
    const n = /^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$/.test(t.image) ? Number(t.image) : NaN;
    return Number.isFinite(n) ? { kind: 'number', text: t.image, number: n, loc } : { kind: 'bad-number', text: t.image, loc };
  }
}

/** Lexes, parses and builds the AST of one file; never throws on any input. */
export function buildAst(text: string, file: string): { doc: AstDocument; diagnostics: Diagnostic[] } {
  const diagnostics: Diagnostic[] = [];
  const parsed = parseText(text);
  const lines = text.split('\n');
  for (const e of parsed.lexErrors) {
    const ch = text.slice(e.offset, e.offset + e.length);
    const first = ch[0] ?? '';
    const hint = first === '=' || first === ':'
      ? "keys and values are separated by spaces only: write `bits 4`, not `bits = 4` or `bits: 4`"
      : first === ';'
        ? 'settings need no terminator; separate them with spaces or new lines'
        : first === '/'
          ? 'comments start with #'
          : undefined;
    const shown = ch.length > 12 ? `${ch.slice(0, 12)}…` : ch;
    const endCol = Math.min(e.column + e.length, (lines[e.line - 1]?.length ?? 0) + 1);
    diagnostics.push({ severity: 'error', message: `unexpected character${e.length > 1 ? 's' : ''} '${shown}'`, file, line: e.line, col: e.column, endCol: Math.max(endCol, e.column + 1), hint });
  }
  if (parsed.tooDeep) {
    diagnostics.push({ severity: 'error', message: `blocks are nested more than ${MAX_DEPTH} deep`, ...locOf(parsed.tooDeep, file), hint: 'the rest of the file was not read' });
  }
  const builder = new AstBuilder(file, diagnostics);
  const items = builder.visit(parsed.cst) as AstItem[];
  diagnostics.push(...recognitionDiagnostics(parsed, file, lines, builder));
  // Recovery can meet the same bad token twice (once in the block it breaks, once where it resumes).
  const seen = new Set<string>();
  const unique = diagnostics.filter((d) => {
    const k = `${d.line}:${d.col}:${d.message}`;
    return seen.has(k) ? false : (seen.add(k), true);
  });
  return { doc: { file, items }, diagnostics: unique };
}

function recognitionDiagnostics(parsed: ReturnType<typeof parseText>, file: string, lines: string[], b: AstBuilder): Diagnostic[] {
  const out: Diagnostic[] = [];
  let reportedUnclosed = false;
  for (const e of parsed.parseErrors) {
    const t = e.token;
    const rule = e.context?.ruleStack?.at(-1);
    if (!isReal(t)) {
      if (parsed.tooDeep) continue; // the input was cut short on purpose, and that is reported
      // Ran out of input (every rule still open reports it): name each brace that was never closed, once.
      if (reportedUnclosed) continue;
      reportedUnclosed = true;
      const { unclosed, suspects } = braces(parsed.tokens, lines);
      if (unclosed.length === 0) {
        const last = parsed.tokens.at(-1);
        const at = last ? b.loc(last) : { file, line: 1, col: 1, endCol: 2 };
        out.push({ severity: 'error', message: rule === 'value' ? "the file ends where a value was expected after ','" : 'unexpected end of file', ...at });
        continue;
      }
      // The brace that is really missing its '}' is often an inner one whose block then swallowed the
      // rest: a '}' less indented than the line that opened its block points at it.
      const related = suspects.map(({ open, close }) => ({ message: `is this block missing its '}'? the '}' that closes it (line ${close.startLine}) is indented less than this line`, ...b.loc(open) }));
      for (const open of unclosed) {
        out.push({ severity: 'error', message: "this '{' is never closed", ...b.loc(open), hint: "add the missing '}'", ...(related.length ? { related } : {}) });
      }
      continue;
    }
    const at = b.loc(t);
    if (rule === 'value') {
      out.push({ severity: 'error', message: `expected a value after ',', found ${describe(t)}`, ...at, hint: 'remove the trailing comma or add the missing value' });
    } else if (rule === 'block' && t.image === '{') {
      out.push({ severity: 'error', message: "unexpected '{': a block must follow a key, as in `llama { … }`", ...at });
    } else {
      out.push({ severity: 'error', message: `unexpected ${describe(t)}`, ...at });
    }
  }
  return out;
}

/** Braces left open at the end, and opening braces whose '}' sits, first on its line, left of their line's indentation. */
function braces(tokens: IToken[], lines: string[]): { unclosed: IToken[]; suspects: { open: IToken; close: IToken }[] } {
  const indent = (line: number) => /^[ \t]*/.exec(lines[line - 1] ?? '')![0].length;
  const stack: IToken[] = [];
  const suspects: { open: IToken; close: IToken }[] = [];
  for (const t of tokens) {
    if (t.tokenType === LCurly) stack.push(t);
    else if (t.tokenType === RCurly) {
      const open = stack.pop();
      const line = t.startLine ?? 1;
      const firstOnLine = (t.startColumn ?? 1) - 1 === indent(line);
      if (open && firstOnLine && indent(line) < indent(open.startLine ?? 1)) suspects.push({ open, close: t });
    }
  }
  return { unclosed: stack, suspects };
}
