// Calibration sequences for GPTQ from a text file: documents (split on <|endoftext|> when present), each
// encoded with BOS and cut into windows, until enough windows are collected.
import { readFileSync } from 'node:fs';
import { QaloraError } from '../errors.ts';
import type { Tokenizer } from '../tokenizer/types.ts';
import type { CalibrationSource } from './prepare.ts';

export interface CalibOptions {
  /** Number of sequences (default 64). */
  samples?: number;
  /** Tokens per sequence, BOS included (default 256, at most the context). */
  tokens?: number;
  context: number;
}

export function calibrationFromText(path: string, tok: Tokenizer, o: CalibOptions): CalibrationSource {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new QaloraError(`${path}: cannot read calibration text (${(e as Error).message})`);
  }
  const samples = o.samples ?? 64, len = Math.min(o.tokens ?? 256, o.context);
  if (!Number.isInteger(samples) || samples < 1) throw new QaloraError(`calibration samples must be a positive integer, got ${samples}`);
  if (!Number.isInteger(len) || len < 2) throw new QaloraError(`calibration tokens per sample must be an integer ≥ 2, got ${len}`);
  const sequences: Int32Array[] = [];
  for (const doc of text.split('<|endoftext|>')) {
    const body = doc.trim();
    if (!body) continue;
    const ids = tok.encode(body, { bos: true });
    for (let s = 0; s + 1 < ids.length && sequences.length < samples; s += len) {
      const w = ids.slice(s, s + len);
      if (s > 0) w[0] = tok.bos; // every window starts like a document does
      sequences.push(Int32Array.from(w));
    }
    if (sequences.length >= samples) break;
  }
  if (sequences.length === 0) throw new QaloraError(`${path}: no text to calibrate on`);
  return { sequences };
}
