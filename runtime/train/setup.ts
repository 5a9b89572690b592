// What train, eval, merge, export and the demo share: opening a model with the spec it needs (taken from a
// merged file's metadata when no --spec is given), the data tokenizer's cache fingerprint, and data windows.
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import type { ResolvedSpec } from '../../dsl/resolved.ts';
import { loadTokenStream } from '../data/cache.ts';
import { splitWindows, type Split } from '../data/dataset.ts';
import type { ReadOptions } from '../data/examples.ts';
import { dataTokenizer, type DataTokenizer } from '../data/tokenize.ts';
import { QaloraError } from '../errors.ts';
import { isQuantizedBase } from '../model/basefile.ts';
import { openModel, type OpenedModel, type OpenOptions } from '../model/open.ts';
import { openSafetensors } from '../safetensors.ts';
import type { Tokenizer } from '../tokenizer/types.ts';

/** Metadata keys our merged files carry so they reopen without extra flags. */
export const META_SPEC = 'qalora_spec';
export const META_TOKENIZER = 'qalora_tokenizer';

/** The spec and tokenizer recorded in a merged/quantized file, when there are any. */
export function recordedRunInfo(model: string): { spec?: ResolvedSpec; tokenizer?: string } {
  if (!model.endsWith('.safetensors') || !existsSync(model) || !isQuantizedBase(model)) return {};
  const f = openSafetensors(model); // the header alone: the base may be gigabytes
  f.close();
  const md = f.metadata;
  const tokenizer = md[META_TOKENIZER] && existsSync(md[META_TOKENIZER]) ? md[META_TOKENIZER] : undefined;
  return { spec: md[META_SPEC] ? (JSON.parse(md[META_SPEC]) as ResolvedSpec) : undefined, tokenizer };
}

/** openModel, with the spec and tokenizer of a merged file filled in when not given. */
export async function openForRun(o: OpenOptions): Promise<OpenedModel & { spec?: ResolvedSpec }> {
  const rec = recordedRunInfo(o.model);
  const spec = o.spec ?? rec.spec;
  const opened = await openModel({ ...o, spec, tokenizer: o.tokenizer ?? rec.tokenizer });
  return { ...opened, spec: opened.model.spec };
}

/** The file a tokenizer came from: --tokenizer, else the model file (GGUF) or llama2.c's tokenizer beside it. */
export function tokenizerSource(model: string, tokenizer?: string): string | undefined {
  if (tokenizer) return tokenizer;
  const rec = recordedRunInfo(model);
  if (rec.tokenizer) return rec.tokenizer;
  if (existsSync(model) && statSync(model).isDirectory()) {
    for (const n of ['tokenizer.json', 'tokenizer.model', 'tokenizer.bin']) if (existsSync(join(model, n))) return join(model, n);
  }
  // llama2.c checkpoints keep tokenizer.bin or tok<vocab>.bin beside them (where loadModel finds it).
  if (existsSync(model) && statSync(model).isFile() && !model.endsWith('.gguf') && !model.endsWith('.safetensors')) {
    const dir = dirname(model);
    const found = readdirSync(dir).filter((n) => n === 'tokenizer.bin' || /^tok\d+\.bin$/.test(n));
    if (found.length === 1) return join(dir, found[0]);
  }
  return model;
}

/**
 * Identifies a tokenizer for the token cache: its file's sha256 (small files) or size+mtime (large ones),
 * plus how it encodes a probe string, so an edited vocabulary never reuses stale tokens.
 */
export function tokenizerFingerprint(tok: Tokenizer, source?: string): string {
  const h = createHash('sha256');
  const probe = 'Once upon a time, 3 émigrés said "日本" — 12.5%!\n\tcode: x = y[i] + 1;';
  h.update(JSON.stringify({ n: tok.vocabSize, bos: tok.bos, eos: tok.eos, probe: tok.encode(probe) }));
  if (source && existsSync(source) && statSync(source).isFile()) {
    const st = statSync(source);
    if (st.size < 64 << 20) h.update(readFileSync(source));
    else h.update(`${source}:${st.size}:${st.mtimeMs}`);
  }
  return h.digest('hex').slice(0, 24);
}

export function dataTokenizerFor(tok: Tokenizer, source?: string): DataTokenizer {
  return dataTokenizer(tok, tokenizerFingerprint(tok, source));
}

export interface DataSetup {
  split: Split;
  examples: number;
  tokens: number;
  cached: boolean;
  cacheKey: string;
}

/** Reads (or fetches from the cache), tokenizes and packs a data file, holding out `valFraction` of it. */
export function prepareData(path: string, tok: DataTokenizer, seqLen: number, valFraction: number, read: ReadOptions = {}): DataSetup {
  if (!existsSync(path)) throw new QaloraError(`${path}: no such data file`);
  const s = loadTokenStream(path, tok, read);
  const split = splitWindows(s, seqLen, valFraction, tok.eos);
  return { split, examples: s.examples, tokens: s.tokens.length, cached: s.cached, cacheKey: s.cachePath ?? '' };
}

/**
 * The chat template for chat data: an explicit file (Jinja text, or JSON with `chat_template`), else the HF model
 * directory's tokenizer_config.json, else none (the data reader's plain default).
 */
export function chatTemplateFor(model: string, file?: string): { template?: string; bos?: string; eos?: string } {
  const fromJson = (path: string) => {
    const j = JSON.parse(readFileSync(path, 'utf8')) as Record<string, unknown>;
    const tpl = j.chat_template;
    const text = typeof tpl === 'string' ? tpl : Array.isArray(tpl) ? (tpl as { name: string; template: string }[]).find((t) => t.name === 'default')?.template : undefined;
    const tok = (v: unknown) => (typeof v === 'string' ? v : typeof (v as { content?: unknown })?.content === 'string' ? (v as { content: string }).content : undefined);
    return { template: text, bos: tok(j.bos_token), eos: tok(j.eos_token) };
  };
  if (file) {
    if (!existsSync(file)) throw new QaloraError(`${file}: no such chat template file`);
    if (file.endsWith('.json')) {
      const r = fromJson(file);
      if (!r.template) throw new QaloraError(`${file}: has no chat_template`);
      return r;
    }
    return { template: readFileSync(file, 'utf8') };
  }
  const beside = existsSync(model) && statSync(model).isDirectory() ? join(model, 'tokenizer_config.json') : join(dirname(model), 'tokenizer_config.json');
  return existsSync(beside) ? fromJson(beside) : {};
}

/** Training sequences default to the model's context, capped: long windows cost time, not quality, on small data. */
export function defaultSeqLen(context: number): number {
  return Math.min(context, 256);
}
