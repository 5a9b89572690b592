import { describe, expect, it } from 'vitest';
import llamaTokenizer from 'llama-tokenizer-js';
import { readFileSync, writeFileSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fixture, needs } from './fixtures.ts';
import { readLlama2cTokenizer } from '../runtime/tokenizer/llama2c.ts';
import { SentencePieceBpe } from '../runtime/tokenizer/sentencepiece.ts';
import { readSentencePieceModel } from '../runtime/tokenizer/spm-model.ts';
import { StreamDecoder } from '../runtime/tokenizer/types.ts';
import { QaloraError } from '../runtime/errors.ts';

const TOK512 = 'models/stories260K/tok512.bin';
const LLAMA2 = 'models/llama2-tokenizer/tokenizer.bin';
const SPM = 'models/llama2-tokenizer/tokenizer.model';

const samples = [
  'Hello, world!',
  'Once upon a time, there was a little girl named Lily.',
  'naïve café — déjà vu',
  'emoji 😀🎉 and a flag 🇫🇷',
  '日本語のテキストと中文',
  'whitespace   runs\t\ttabs\n\nnewlines  \n end ',
  '  leading spaces',
  'trailing spaces   ',
  'numbers 1234567890 3.14159 -42',
  'code: function f(x) { return x * 2; } // comment',
  '\u0000\u0001 control bytes \u007f',
  'Ünïcödé ŝtrïñg wîth äccénts ø å ß',
  'a',
  ' ',
  '',
];

describe('SentencePiece BPE (llama2.c tokenizer.bin)', () => {
  it('tok512: the documented encodings', () => {
    const tok = readLlama2cTokenizer(fixture(TOK512));
    expect(tok.vocabSize).toBe(512);
    expect(tok.encode('Once upon a time', { bos: true })).toEqual([1, 403, 407, 261, 378]);
    expect(tok.encode('Hello, world!', { bos: true })).toEqual([1, 346, 306, 414, 432, 263, 304, 341, 443]);
    expect(tok.encode('Once upon a time', { bos: true, eos: true }).at(-1)).toBe(2);
    expect(tok.encode('')).toEqual([]);
  });

  it('LLaMA-2 vocabulary agrees with llama-tokenizer-js on varied text', needs(LLAMA2), () => {
    const tok = readLlama2cTokenizer(fixture(LLAMA2));
    expect(tok.vocabSize).toBe(32000);
    expect(tok.encode('Hello, world!', { bos: true })).toEqual([1, 15043, 29892, 3186, 29991]);
    for (const s of samples) {
      if (s === '') continue; // the oracle adds a dummy prefix even to empty text
      expect(tok.encode(s, { bos: true }), JSON.stringify(s)).toEqual(llamaTokenizer.encode(s, true, true));
    }
    // a long text: the heap merge must agree with the oracle's on thousands of symbols
    const long = samples.join(' ').repeat(20);
    expect(tok.encode(long, { bos: true })).toEqual(llamaTokenizer.encode(long, true, true));
  });

  it('SentencePiece .model (protobuf) files encode exactly like their llama2.c exports', needs(LLAMA2, SPM, TOK512, 'models/stories260K/tok512.model'), () => {
    for (const [bin, model] of [[LLAMA2, SPM], [TOK512, 'models/stories260K/tok512.model']]) {
      const a = readLlama2cTokenizer(fixture(bin));
      const b = readSentencePieceModel(fixture(model));
      expect(b.vocabSize).toBe(a.vocabSize);
      for (const s of samples) expect(b.encode(s, { bos: true }), `${model}: ${JSON.stringify(s)}`).toEqual(a.encode(s, { bos: true }));
    }
  });

  it('byte fallback: emoji become <0xNN> tokens that decode back', () => {
    const tok = readLlama2cTokenizer(fixture(TOK512));
    const ids = tok.encode('😀', { bos: false });
    const bytes = [...new TextEncoder().encode('😀')];
    expect(ids.slice(-4)).toEqual(bytes.map((b) => b + 3)); // tok512's byte tokens are id = byte + 3
    expect(tok.decode([1, ...ids])).toBe('😀');
  });

  it('decode inverts encode; the space after BOS is stripped as llama2.c does', needs(TOK512, LLAMA2), () => {
    for (const path of [TOK512, LLAMA2]) {
      const tok = readLlama2cTokenizer(fixture(path));
      for (const s of samples) expect(tok.decode(tok.encode(s, { bos: true, eos: true }))).toBe(s);
      // without BOS the dummy-prefix space stays (llama2.c strips only after BOS)
      expect(tok.decode(tok.encode('Hi there', { bos: false }))).toBe(' Hi there');
    }
  });

  it('decodeToken prints what llama2.c prints; StreamDecoder reassembles split characters', () => {
    const tok = readLlama2cTokenizer(fixture(TOK512));
    const ids = tok.encode('Once upon a time 😀!', { bos: true });
    let printed = '';
    for (let i = 1; i < ids.length; i++) printed += tok.decodeToken(ids[i - 1], ids[i]);
    // llama2.c's safe_printf drops single non-printable bytes, so the emoji's byte tokens print nothing
    expect(printed).toBe('Once upon a time !');
    const stream = new StreamDecoder(tok, ids[0]);
    let streamed = '';
    for (let i = 1; i < ids.length; i++) streamed += stream.push(ids[i]);
    expect(streamed + stream.flush()).toBe('Once upon a time 😀!');
    // a lone control byte prints nothing either way (llama2.c's safe_printf), a newline byte token does
    const ctl = tok.encode('\u0001\n', { bos: false }).slice(1);
    expect(ctl.map((id) => tok.decodeToken(0, id))).toEqual(['', '\n']);
    const s2 = new StreamDecoder(tok, 1);
    expect(ctl.map((id) => s2.push(id))).toEqual(['', '\n']);
    expect(tok.decodeToken(1, 2)).toBe(''); // EOS prints nothing
    expect(() => tok.decodeToken(1, 512)).toThrow(/outside the vocabulary/);
  });

  it('merges by highest score, leftmost on ties (a vocabulary built to tell the rules apart)', () => {
    const enc = new TextEncoder();
    // The higher-scoring pair merges first even when it is not leftmost; equal scores merge leftmost first;
    // merging continues through longer pieces while they exist.
    const mk = (pieces: [string, number][]) => new SentencePieceBpe({
      pieces: pieces.map(([p]) => enc.encode(p)), scores: pieces.map(([, s]) => s), bos: 1, eos: 2, source: 'test',
    });
    const base: [string, number][] = [['<unk>', 0], ['<s>', 0], ['</s>', 0], [' ', -5], ['a', -5], ['b', -5], ['c', -5]];
    const v1 = mk([...base, ['ab', -2], ['bc', -1]]);
    expect(v1.encode('abc').map((i) => v1.piece(i))).toEqual([' ', 'a', 'bc']);
    const v2 = mk([...base, ['ab', -1], ['bc', -1]]); // tie: the leftmost pair merges
    expect(v2.encode('abc').map((i) => v2.piece(i))).toEqual([' ', 'ab', 'c']);
    const v3 = mk([...base, ['ab', -1], ['bc', -1], ['abc', -3], [' abc', -4]]);
    expect(v3.encode('abc').map((i) => v3.piece(i))).toEqual([' abc']);
    // no byte tokens and an unknown character: a clear error
    expect(() => v1.encode('z')).toThrow(QaloraError);
  });

  it('rejects truncated or foreign tokenizer files, naming the file', () => {
    const dir = mkdtempSync(join(tmpdir(), 'qalora-tok-'));
    const good = readFileSync(fixture(TOK512));
    const cut = join(dir, 'cut.bin');
    writeFileSync(cut, good.subarray(0, good.length - 3));
    expect(() => readLlama2cTokenizer(cut)).toThrow(/cut\.bin: token 511 has length/);
    expect(() => readLlama2cTokenizer(fixture(TOK512), 1000)).toThrow(/has 512 tokens but the model's vocabulary is 1000/);
    const junk = join(dir, 'junk.bin');
    writeFileSync(junk, Buffer.from([0xff, 0xff, 0xff, 0xff, 1, 2, 3]));
    expect(() => readLlama2cTokenizer(junk)).toThrow(/junk\.bin: not a llama2\.c tokenizer/);
  });
});
