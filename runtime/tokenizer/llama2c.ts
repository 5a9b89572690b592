// llama2.c tokenizer.bin: i32 max_token_length, then per token: f32 score, i32 byte length, bytes.
// The vocabulary size is not stored: it is every record up to the end of the file, and must match the model's.
import { readFileSync } from 'node:fs';
import { QaloraError } from '../errors.ts';
import { SentencePieceBpe } from './sentencepiece.ts';

export function readLlama2cTokenizer(path: string, vocabSize?: number): SentencePieceBpe {
  let buf: Buffer;
  try {
    buf = readFileSync(path);
  } catch (e) {
    throw new QaloraError(`${path}: cannot read tokenizer (${(e as Error).message})`);
  }
  return parseLlama2cTokenizer(buf, path, vocabSize);
}

export function parseLlama2cTokenizer(buf: Buffer, path: string, vocabSize?: number): SentencePieceBpe {
  if (buf.length < 4) throw new QaloraError(`${path}: not a llama2.c tokenizer (${buf.length} bytes)`);
  const maxLen = buf.readInt32LE(0);
  if (maxLen <= 0 || maxLen > 1 << 16) throw new QaloraError(`${path}: not a llama2.c tokenizer (max_token_length ${maxLen})`);
  const pieces: Uint8Array[] = [];
  const scores: number[] = [];
  let o = 4;
  while (o < buf.length) {
    if (o + 8 > buf.length) throw new QaloraError(`${path}: truncated at token ${pieces.length} (record header needs 8 bytes at offset ${o})`);
    const score = buf.readFloatLE(o);
    const len = buf.readInt32LE(o + 4);
    o += 8;
    if (len < 0 || len > maxLen || o + len > buf.length) {
      throw new QaloraError(`${path}: token ${pieces.length} has length ${len} (max_token_length ${maxLen}, ${buf.length - o} bytes left): truncated or not a tokenizer.bin`);
    }
    pieces.push(new Uint8Array(buf.subarray(o, o + len)));
    scores.push(score);
    o += len;
  }
  if (vocabSize !== undefined && pieces.length !== vocabSize) {
    throw new QaloraError(`${path}: has ${pieces.length} tokens but the model's vocabulary is ${vocabSize} (a tokenizer for another model?)`);
  }
  return new SentencePieceBpe({ pieces, scores, bos: 1, eos: 2, source: path });
}
