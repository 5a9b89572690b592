// The tokenizer interface every loader returns (llama2.c tokenizer.bin, GGUF vocabulary, HF tokenizer.json).

export interface EncodeOptions {
  bos?: boolean;
  eos?: boolean;
}

export interface Tokenizer {
  encode(text: string, opts?: EncodeOptions): number[];
  /** Whole-sequence decode: BOS/EOS dropped, byte tokens joined into UTF-8, the space after BOS stripped. */
  decode(ids: readonly number[]): string;
  /** The piece llama2.c's `run` prints for `id` after `prev` (empty for what it would not print). */
  decodeToken(prev: number, id: number): string;
  /**
   * Optional exact streaming: the raw bytes of the piece (byte tokens as their byte). Feed them to a
   * StreamDecoder to print multi-byte characters split over byte-fallback tokens correctly.
   */
  pieceBytes?(prev: number, id: number): Uint8Array;
  readonly bos: number;
  readonly eos: number;
  readonly vocabSize: number;
}

/** Turns a stream of token ids into text, holding back incomplete UTF-8 sequences until they complete. */
export class StreamDecoder {
  private readonly utf8 = new TextDecoder('utf-8');
  private prev: number;
  constructor(private readonly tok: Tokenizer, prev = -1) {
    this.prev = prev;
  }
  push(id: number): string {
    const prev = this.prev;
    this.prev = id;
    if (!this.tok.pieceBytes) return this.tok.decodeToken(prev, id);
    const bytes = this.tok.pieceBytes(prev, id);
    // As llama2.c's safe_printf, a lone control byte is not printed; bytes ≥ 0x80 are kept and assembled into
    // characters (where llama2.c drops them).
    if (bytes.length === 1 && bytes[0] < 0x80 && !((bytes[0] >= 0x20 && bytes[0] < 0x7f) || (bytes[0] >= 0x09 && bytes[0] <= 0x0d))) return '';
    return this.utf8.decode(bytes, { stream: true });
  }
  flush(): string {
    return this.utf8.decode();
  }
}
