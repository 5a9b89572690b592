// The syntax tree of a .qal file. The language has one shape throughout — `key value, value … { items }` —
// so the tree is generic: meaning (which keys exist where, what values they take) belongs to validate.ts,
// which can then report every problem with its exact place instead of the parser failing on the first one.
import type { Loc } from './diagnostics.ts';

export type ValueKind =
  | 'name' // identifier: mean, fp16, sm_90, a spec or layer name
  | 'number' // a well-formed number; `number` holds its value
  | 'string' // "text", quotes removed
  | 'bad-number' // looks like a number but is not one (64k, 1.2.3)
  | 'bad-string'; // a string missing its closing quote

export interface AstValue {
  kind: ValueKind;
  /** The source text of the token (for strings: without the quotes). */
  text: string;
  number?: number;
  loc: Loc;
}

export interface AstBlock {
  open: Loc;
  /** Absent when the block was never closed (a syntax error was reported). */
  close?: Loc;
  items: AstItem[];
}

export interface AstItem {
  key: string;
  keyLoc: Loc;
  values: AstValue[];
  block?: AstBlock;
}

export interface AstDocument {
  file: string;
  items: AstItem[];
}
