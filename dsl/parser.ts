// The grammar, as a chevrotain CstParser with error recovery, so one run reports several syntax errors:
//
//   document := ( item | stray )*
//   item     := Identifier ( value ( ',' value )* )? block?     (the first value on the key's line)
//   block    := '{' ( item | stray )* '}'
//   value    := Identifier | Number | String
//
// `stray` consumes a token that cannot start an item (a number without a key, a lone ',' or, at the top
// level, an unmatched '}'); the visitor reports it and parsing simply goes on with the next token.
import { CstParser, type IRecognitionException, type IToken, type CstNode } from 'chevrotain';
import { allTokens, Comma, Identifier, LCurly, NumberLiteral, RCurly, StringLiteral, qalLexer } from './lexer.ts';

class QalParser extends CstParser {
  constructor() {
    super(allTokens, { recoveryEnabled: true, maxLookahead: 1 });
    this.performSelfAnalysis();
  }

  document = this.RULE('document', () => {
    this.MANY(() =>
      this.OR([
        { ALT: () => this.SUBRULE(this.item) },
        { ALT: () => this.CONSUME(NumberLiteral, { LABEL: 'stray' }) },
        { ALT: () => this.CONSUME(StringLiteral, { LABEL: 'stray' }) },
        { ALT: () => this.CONSUME(Comma, { LABEL: 'stray' }) },
        { ALT: () => this.CONSUME(RCurly, { LABEL: 'stray' }) },
        { ALT: () => this.CONSUME(LCurly, { LABEL: 'stray' }) },
      ]),
    );
  });

  item = this.RULE('item', () => {
    this.CONSUME(Identifier, { LABEL: 'key' });
    // A key's first value must be on its own line: then a key whose value is missing cannot swallow the
    // key on the next line as its value (`rank` ⏎ `alpha 16` reports `rank` without a value, nothing else).
    this.OPTION({
      GATE: () => this.LA(1).startLine === this.LA(0).startLine,
      DEF: () => {
        this.SUBRULE(this.value);
        this.MANY(() => {
          this.CONSUME(Comma);
          this.SUBRULE2(this.value);
        });
      },
    });
    this.OPTION2(() => this.SUBRULE(this.block));
  });

  block = this.RULE('block', () => {
    this.CONSUME(LCurly);
    this.MANY(() =>
      this.OR([
        { ALT: () => this.SUBRULE(this.item) },
        { ALT: () => this.CONSUME(NumberLiteral, { LABEL: 'stray' }) },
        { ALT: () => this.CONSUME(StringLiteral, { LABEL: 'stray' }) },
        { ALT: () => this.CONSUME(Comma, { LABEL: 'stray' }) },
      ]),
    );
    this.CONSUME(RCurly);
  });

  value = this.RULE('value', () => {
    this.OR([
      { ALT: () => this.CONSUME(Identifier) },
      { ALT: () => this.CONSUME(NumberLiteral) },
      { ALT: () => this.CONSUME(StringLiteral) },
    ]);
  });
}

// Building the parser (grammar analysis) takes a few milliseconds: do it once per process.
export const qalParser = new QalParser();

export interface ParseResult {
  cst: CstNode;
  /** The first '{' nested deeper than MAX_DEPTH, if any (parsing stopped there). */
  tooDeep?: IToken;
  tokens: IToken[];
  lexErrors: { offset: number; line: number; column: number; length: number }[];
  parseErrors: IRecognitionException[];
}

/** Deeper nesting than any spec needs; the limit keeps the recursive parser far from the stack's end. */
export const MAX_DEPTH = 32;

export function parseText(text: string): ParseResult {
  const lexed = qalLexer.tokenize(text);
  const tooDeep = firstTooDeepBrace(lexed.tokens);
  // Parse only what precedes the offending brace; the visitor reports it.
  qalParser.input = tooDeep === undefined ? lexed.tokens : lexed.tokens.slice(0, tooDeep);
  const cst = qalParser.document();
  return {
    cst,
    tooDeep: tooDeep === undefined ? undefined : lexed.tokens[tooDeep],
    tokens: lexed.tokens,
    lexErrors: lexed.errors.map((e) => ({ offset: e.offset, line: e.line ?? 1, column: e.column ?? 1, length: e.length })),
    parseErrors: [...qalParser.errors],
  };
}

function firstTooDeepBrace(tokens: IToken[]): number | undefined {
  let depth = 0;
  for (let i = 0; i < tokens.length; i++) {
    if (tokens[i].tokenType === LCurly && ++depth > MAX_DEPTH) return i;
    if (tokens[i].tokenType === RCurly) depth = Math.max(0, depth - 1);
  }
  return undefined;
}
