// SentencePiece tokenizer.model (a ModelProto protobuf): pieces {piece, score, type}, trainer_spec {model_type,
// bos_id, eos_id}. Only BPE models are accepted (LLaMA's); the merge rule then is the one SentencePieceBpe runs.
import { readFileSync } from 'node:fs';
import { QaloraError } from '../errors.ts';
import { SentencePieceBpe } from './sentencepiece.ts';

/** Protobuf wire-format fields of one message: [field number, wire type, value (number or bytes)]. */
function* fields(buf: Uint8Array, where: string): Generator<[number, number, number | Uint8Array]> {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let o = 0;
  const varint = (): number => {
    let v = 0, mul = 1;
    for (;;) {
      if (o >= buf.length) throw new QaloraError(`${where}: truncated protobuf`);
      const b = buf[o++];
      v += (b & 0x7f) * mul;
      if (!(b & 0x80)) return v;
      mul *= 128;
    }
  };
  while (o < buf.length) {
    const key = varint();
    const field = Math.floor(key / 8), wire = key & 7;
    if (wire === 0) yield [field, wire, varint()];
    else if (wire === 1) { o += 8; yield [field, wire, 0]; }
    else if (wire === 5) {
      if (o + 4 > buf.length) throw new QaloraError(`${where}: truncated protobuf`);
      yield [field, wire, dv.getFloat32(o, true)];
      o += 4;
    } else if (wire === 2) {
      const n = varint();
      if (o + n > buf.length) throw new QaloraError(`${where}: truncated protobuf (field ${field} needs ${n} bytes)`);
      yield [field, wire, buf.subarray(o, o + n)];
      o += n;
    } else throw new QaloraError(`${where}: not a SentencePiece model (protobuf wire type ${wire})`);
  }
}

export function readSentencePieceModel(path: string): SentencePieceBpe {
  let buf: Buffer;
  try {
    buf = readFileSync(path);
  } catch (e) {
    throw new QaloraError(`${path}: cannot read SentencePiece model (${(e as Error).message})`);
  }
  const pieces: Uint8Array[] = [], scores: number[] = [], types: number[] = [];
  let bos = 1, eos = 2, modelType = 1;
  for (const [field, , value] of fields(buf, path)) {
    if (field === 1 && value instanceof Uint8Array) {
      let piece: Uint8Array = new Uint8Array(0), score = 0, type = 1;
      for (const [f, , v] of fields(value, path)) {
        if (f === 1 && v instanceof Uint8Array) piece = v;
        else if (f === 2) score = v as number;
        else if (f === 3) type = v as number;
      }
      pieces.push(new TextEncoder().encode(new TextDecoder().decode(piece).replaceAll('\u2581', ' ')));
      scores.push(score);
      types.push(type);
    } else if (field === 2 && value instanceof Uint8Array) {
      for (const [f, , v] of fields(value, path)) {
        if (f === 3) modelType = v as number;
        else if (f === 41) bos = v as number;
        else if (f === 42) eos = v as number;
      }
    }
  }
  if (pieces.length === 0) throw new QaloraError(`${path}: not a SentencePiece model (no pieces)`);
  if (modelType !== 2) throw new QaloraError(`${path}: SentencePiece model_type ${modelType === 1 ? 'UNIGRAM' : modelType} is not supported (BPE only)`);
  return new SentencePieceBpe({ pieces, scores, types, bos, eos, source: path });
}
