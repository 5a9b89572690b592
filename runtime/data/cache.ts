// Tokenize once: token streams are cached under .cache/data/ (or a given dir), keyed by the data file's
// sha256, the tokenizer's fingerprint and every option that changes the result.
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { asI32, readSafetensors, tensorOf, writeSafetensors } from '../safetensors.ts';
import { readExamples, type ReadOptions } from './examples.ts';
import { tokenizeExamples, type DataTokenizer, type TokenStream } from './tokenize.ts';

const CACHE_VERSION = '1';

export function defaultCacheDir(): string {
  return resolve(process.env.QALORA_CACHE ?? join(process.cwd(), '.cache'), 'data');
}

export function sha256File(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

export function streamCacheKey(path: string, tok: DataTokenizer, opts: ReadOptions): string {
  const h = createHash('sha256');
  h.update(JSON.stringify({ v: CACHE_VERSION, file: sha256File(path), tok: tok.fingerprint, opts }));
  return h.digest('hex').slice(0, 32);
}

export interface LoadStreamResult extends TokenStream {
  /** Whether it came from the cache. */
  cached: boolean;
  cachePath: string | null;
  examples: number;
}

/** Reads, tokenizes and caches a data file; a cache hit skips reading the examples altogether. */
export function loadTokenStream(
  path: string,
  tok: DataTokenizer,
  opts: ReadOptions = {},
  cache: { dir?: string; enabled?: boolean } = {},
): LoadStreamResult {
  const enabled = cache.enabled ?? true;
  const dir = cache.dir ?? defaultCacheDir();
  const file = enabled ? join(dir, `${streamCacheKey(path, tok, opts)}.safetensors`) : null;
  if (file && existsSync(file)) {
    try {
      const st = readSafetensors(file);
      const tokens = asI32(st.tensors.get('tokens')!).slice();
      const mask = st.tensors.get('mask')!.data.slice();
      const starts = asI32(st.tensors.get('starts')!).slice();
      return { tokens, mask, starts, cached: true, cachePath: file, examples: starts.length };
    } catch {
      // A damaged cache entry is rebuilt below.
    }
  }
  const stream = tokenizeExamples(readExamples(path, opts), tok);
  if (file) {
    mkdirSync(dir, { recursive: true });
    writeSafetensors(
      file,
      {
        tokens: tensorOf('I32', [stream.tokens.length], stream.tokens),
        mask: tensorOf('U8', [stream.mask.length], stream.mask),
        starts: tensorOf('I32', [stream.starts.length], stream.starts),
      },
      { source: resolve(path), tokenizer: tok.fingerprint, options: JSON.stringify(opts) },
    );
  }
  return { ...stream, cached: false, cachePath: file, examples: stream.starts.length };
}
