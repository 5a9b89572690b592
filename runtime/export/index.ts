// One entry for every export format; each says plainly what it could and could not represent exactly.
import { resolve } from 'node:path';
import type { ResolvedSpec } from '../../dsl/resolved.ts';
import { QaloraError } from '../errors.ts';
import { saveQuantizedBase } from '../model/basefile.ts';
import type { LlamaWeights } from '../model/types.ts';
import type { Tokenizer } from '../tokenizer/types.ts';
import { META_SPEC, META_TOKENIZER } from '../train/setup.ts';
import { vocabFromTokenizer, writeGgufModel, type PieceSource } from './gguf.ts';
import { writeGptqModel } from './gptq.ts';

export const EXPORT_FORMATS = ['gguf', 'gptq', 'safetensors'] as const;
export type ExportFormat = (typeof EXPORT_FORMATS)[number];

export interface ExportOptions {
  tokenizer: Tokenizer;
  tokenizerPath?: string;
  spec?: ResolvedSpec;
  lossy?: boolean;
  floatType?: 'f32' | 'f16';
  name?: string;
  /** GPTQ: integer zeros (standard GPTQ readers) instead of float zeros. */
  intZeros?: boolean;
}

export interface ExportResult {
  summary: string;
  maxAbsError: number;
}

function isPieceSource(t: Tokenizer): t is Tokenizer & PieceSource {
  const x = t as unknown as Partial<PieceSource>;
  return typeof x.piece === 'function' && typeof x.score === 'function';
}

export function exportModel(format: ExportFormat, out: string, w: LlamaWeights, o: ExportOptions): ExportResult {
  if (format === 'gguf') {
    if (!isPieceSource(o.tokenizer)) throw new QaloraError('GGUF export needs a SentencePiece vocabulary (llama2.c tokenizer.bin, .model or GGUF); this tokenizer has none');
    const r = writeGgufModel(out, w, vocabFromTokenizer(o.tokenizer), { lossy: o.lossy, floatType: o.floatType, name: o.name });
    const byType = new Map<string, number>();
    for (const t of r.tensors) byType.set(t.type, (byType.get(t.type) ?? 0) + 1);
    const notes = [...new Set(r.tensors.filter((t) => t.note).map((t) => t.note!))];
    return {
      maxAbsError: r.maxAbsError,
      summary:
        `wrote ${out} (GGUF v3, ${(r.bytes / 1024).toFixed(1)} KiB): ${[...byType].map(([t, n]) => `${n} ${t}`).join(', ')} tensors; ` +
        `largest weight error ${r.maxAbsError.toExponential(3)}${r.maxAbsError > 0 ? ' (fp16 rounding of the block scales/offsets)' : ' (exact)'}` +
        (notes.length ? `\nwritten as exact F32 instead of blocks: ${notes.join('; ')}` : ''),
    };
  }
  if (format === 'safetensors') {
    if (!out.endsWith('.safetensors')) throw new QaloraError(`--out ${out}: expected a .safetensors file`);
    const md: Record<string, string> = {};
    if (o.spec) md[META_SPEC] = JSON.stringify(o.spec);
    if (o.tokenizerPath) md[META_TOKENIZER] = resolve(o.tokenizerPath);
    saveQuantizedBase(out, w, md);
    return { maxAbsError: 0, summary: `wrote ${out} (qalora safetensors: packed q, α, β per group; exact)` };
  }
  const r = writeGptqModel(out, w, { intZeros: o.intZeros, lossy: o.lossy });
  return {
    maxAbsError: r.maxAbsError,
    summary:
      `wrote ${out}/ (GPTQ layout, ${o.intZeros ? 'integer zeros' : 'float zeros'}): ${r.quantized} packed layers; largest weight error ${r.maxAbsError.toExponential(3)}` +
      (o.intZeros ? '' : '\nnote: integer-zero GPTQ cannot hold a merged QA-LoRA model (its zeros −β/α are fractional); these are float zeros, which stock GPTQ kernels do not read — use GGUF (Q4_1) to run it in llama.cpp') +
      (r.dense.length ? `\nwritten as exact float weights (GPTQ packing needs in·bits and out·bits multiples of 32): ${r.dense.join(', ')}` : ''),
  };
}
