// Tokens of the .qal language. The grammar is deliberately small (key, values, optional block), so keys
// are plain identifiers rather than keywords: an unknown key then reaches validation, which can say what
// it probably meant, instead of becoming an opaque syntax error.
import { createToken, Lexer } from 'chevrotain';

/** Includes a byte-order mark and no-break spaces, which editors and copied text bring in unseen. */
export const Whitespace = createToken({ name: 'Whitespace', pattern: /[ \t\r\n\uFEFF\u00A0]+/, group: Lexer.SKIPPED, line_breaks: true });
export const Comment = createToken({ name: 'Comment', pattern: /#[^\n]*/, group: Lexer.SKIPPED });

/** Names and words: keys, spec/layer names, enum values (mean, fp16, sm_90a). Hyphens and dots are lexed so
 *  that `llama2-7b` or an unquoted `base.qal` reaches validation whole and gets a clear message. */
export const Identifier = createToken({ name: 'Identifier', pattern: /[A-Za-z_][A-Za-z0-9_.\-]*/ });

/** A number with optional sign, fraction and exponent. Trailing letters are swallowed (`64k`, `1.5x`) so
 *  that the whole word is reported as "not a number" instead of splitting into a number and a stray key. */
export const NumberLiteral = createToken({
  name: 'NumberLiteral',
  pattern: /[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?[A-Za-z0-9_.]*/,
});

/** Double-quoted, no escapes. The closing quote is optional here so that an unterminated string is one
 *  token ending at the end of its line, reported by validation with its exact place. */
export const StringLiteral = createToken({ name: 'StringLiteral', pattern: /"[^"\n]*"?/ });

export const LCurly = createToken({ name: 'LCurly', pattern: '{', label: "'{'" });
export const RCurly = createToken({ name: 'RCurly', pattern: '}', label: "'}'" });
export const Comma = createToken({ name: 'Comma', pattern: ',', label: "','" });

export const allTokens = [Whitespace, Comment, StringLiteral, NumberLiteral, Identifier, LCurly, RCurly, Comma];

// Only '\n' ends a line (a '\r' before it is trailing whitespace), so line numbers agree with
// formatDiagnostics, which splits on '\n'; chevrotain's default would also count a lone '\r'.
export const qalLexer = new Lexer(allTokens, {
  positionTracking: 'full',
  lineTerminatorsPattern: /\n/g,
  lineTerminatorCharacters: ['\n'],
});
