// Hugging Face tokenizer.json through @huggingface/tokenizers, wrapped in our Tokenizer interface; and the
// reverse: a SentencePiece vocabulary written as a LLaMA-style tokenizer.json (BPE + byte fallback).
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers';
import { QaloraError } from '../errors.ts';
import type { EncodeOptions, Tokenizer } from './types.ts';

const BYTE_PIECE = /^<0x([0-9A-Fa-f]{2})>$/;
const utf8 = new TextDecoder('utf-8');

/** GPT-2's byte ↔ printable-character table, for byte-level BPE vocabularies (LLaMA-3 and friends). */
function byteLevelDecoder(): Map<string, number> {
  const bs: number[] = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = [...bs];
  let n = 0;
  for (let b = 0; b < 256; b++) if (!bs.includes(b)) { bs.push(b); cs.push(256 + n++); }
  return new Map(bs.map((b, i) => [String.fromCodePoint(cs[i]), b]));
}

function usesByteLevel(node: unknown): boolean {
  if (!node || typeof node !== 'object') return false;
  const n = node as { type?: string; decoders?: unknown[]; pretokenizers?: unknown[] };
  return n.type === 'ByteLevel' || (n.decoders ?? n.pretokenizers ?? []).some(usesByteLevel);
}

export class HfJsonTokenizer implements Tokenizer {
  readonly bos: number;
  readonly eos: number;
  readonly vocabSize: number;
  private readonly pieces: string[];
  private readonly special = new Set<number>();
  private readonly byteLevel: Map<string, number> | null;

  constructor(private readonly hf: HfTokenizer, json: Record<string, unknown>, config: Record<string, unknown>, source: string) {
    const vocab = hf.get_vocab(true);
    this.vocabSize = Math.max(-1, ...vocab.values()) + 1;
    this.pieces = new Array(this.vocabSize).fill('');
    for (const [piece, id] of vocab) this.pieces[id] = piece;
    for (const t of (json.added_tokens as { id: number; special?: boolean }[] | undefined) ?? []) if (t.special) this.special.add(t.id);
    const tokenId = (key: string, fallback: string): number => {
      const v = config[key];
      const name = typeof v === 'string' ? v : (v as { content?: string } | undefined)?.content ?? fallback;
      const id = hf.token_to_id(name);
      if (id === undefined) throw new QaloraError(`${source}: ${key} '${name}' is not in the vocabulary`);
      return id;
    };
    this.bos = tokenId('bos_token', '<s>');
    this.eos = tokenId('eos_token', '</s>');
    this.special.add(this.bos).add(this.eos);
    this.byteLevel = usesByteLevel(json.decoder) ? byteLevelDecoder() : null;
  }

  encode(text: string, opts: EncodeOptions = {}): number[] {
    const ids = text === '' ? [] : this.hf.encode(text, { add_special_tokens: false }).ids;
    if (opts.bos) ids.unshift(this.bos);
    if (opts.eos) ids.push(this.eos);
    return ids;
  }

  decode(ids: readonly number[]): string {
    return this.hf.decode([...ids], { skip_special_tokens: true, clean_up_tokenization_spaces: false });
  }

  pieceBytes(prev: number, id: number): Uint8Array {
    if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) throw new QaloraError(`token id ${id} is outside the vocabulary (0..${this.vocabSize - 1})`);
    if (this.special.has(id)) return new Uint8Array(0);
    const piece = this.pieces[id];
    if (this.byteLevel) return Uint8Array.from([...piece], (c) => this.byteLevel!.get(c) ?? 0x3f);
    const m = BYTE_PIECE.exec(piece);
    if (m) return Uint8Array.of(parseInt(m[1], 16));
    const text = piece.replaceAll('\u2581', ' ');
    return new TextEncoder().encode(prev === this.bos && text.startsWith(' ') ? text.slice(1) : text);
  }

  decodeToken(prev: number, id: number): string {
    const p = this.pieceBytes(prev, id);
    if (p.length === 1 && !((p[0] >= 0x20 && p[0] < 0x7f) || (p[0] >= 0x09 && p[0] <= 0x0d))) return '';
    return utf8.decode(p);
  }
}

/** Reads tokenizer.json (and tokenizer_config.json beside it, for the BOS/EOS names). */
export function readHfTokenizer(path: string): HfJsonTokenizer {
  let json: Record<string, unknown>;
  try {
    json = JSON.parse(readFileSync(path, 'utf8'));
  } catch (e) {
    throw new QaloraError(`${path}: cannot read tokenizer.json (${(e as Error).message})`);
  }
  const cfgPath = join(dirname(path), 'tokenizer_config.json');
  const config = existsSync(cfgPath) ? JSON.parse(readFileSync(cfgPath, 'utf8')) : {};
  let hf: HfTokenizer;
  try {
    hf = new HfTokenizer(json, config);
  } catch (e) {
    throw new QaloraError(`${path}: unsupported tokenizer.json (${(e as Error).message})`);
  }
  return new HfJsonTokenizer(hf, json, config, path);
}

/** What the writer needs from a SentencePiece vocabulary (SentencePieceBpe has it). */
export interface PieceTable {
  vocabSize: number;
  bos: number;
  eos: number;
  piece(id: number): string;
  score(id: number): number;
}

/**
 * A LLaMA-style tokenizer.json for a SentencePiece vocabulary, as HF's converter writes it: BPE with byte
 * fallback, merges ordered by the score of the merged piece, "▁" for spaces, a dummy-prefix normalizer.
 */
export function sentencePieceToHfJson(tok: PieceTable): { tokenizer: object; config: object } {
  const vocab: Record<string, number> = {};
  const special = new Set([0, tok.bos, tok.eos]);
  const names = new Map<number, string>([[0, '<unk>'], [tok.bos, '<s>'], [tok.eos, '</s>']]);
  const text: string[] = [];
  for (let id = 0; id < tok.vocabSize; id++) {
    const p = names.get(id) ?? tok.piece(id).replaceAll(' ', '\u2581');
    text.push(p);
    if (!(p in vocab)) vocab[p] = id;
  }
  const merges: [number, number, string, string][] = [];
  for (let id = 0; id < tok.vocabSize; id++) {
    const p = text[id];
    if (special.has(id) || BYTE_PIECE.test(p)) continue;
    const chars = [...p];
    for (let k = 1; k < chars.length; k++) {
      const a = chars.slice(0, k).join(''), b = chars.slice(k).join('');
      if (vocab[a] !== undefined && vocab[b] !== undefined) merges.push([tok.score(id), id, a, b]);
    }
  }
  // Higher score first; HF's converter breaks ties by the pair's ids.
  merges.sort((x, y) => y[0] - x[0] || x[1] - y[1] || vocab[x[2]] - vocab[y[2]]);
  const added = [...special].map((id) => ({
    id, content: names.get(id)!, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true,
  }));
  const tokenizer = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: { type: 'Sequence', normalizers: [{ type: 'Prepend', prepend: '\u2581' }, { type: 'Replace', pattern: { String: ' ' }, content: '\u2581' }] },
    pre_tokenizer: null,
    post_processor: null,
    decoder: {
      type: 'Sequence',
      decoders: [
        { type: 'Replace', pattern: { String: '\u2581' }, content: ' ' },
        { type: 'ByteFallback' },
        { type: 'Fuse' },
        { type: 'Strip', content: ' ', start: 1, stop: 0 },
      ],
    },
    model: {
      type: 'BPE', dropout: null, unk_token: '<unk>', continuing_subword_prefix: null, end_of_word_suffix: null,
      fuse_unk: true, byte_fallback: true, ignore_merges: false, vocab, merges: merges.map(([, , a, b]) => [a, b]),
    },
  };
  const config = { bos_token: '<s>', eos_token: '</s>', unk_token: '<unk>', add_bos_token: true, add_eos_token: false, tokenizer_class: 'LlamaTokenizer' };
  return { tokenizer, config };
}
