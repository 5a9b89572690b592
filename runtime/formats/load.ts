// loadModel: one entry point for every checkpoint format, detected by magic, extension or directory contents.
import { existsSync, openSync, readSync, closeSync, statSync } from 'node:fs';
import { dirname, extname, join } from 'node:path';
import type { QaloraSettings } from '../../dsl/resolved.ts';
import { QaloraError } from '../errors.ts';
import type { LlamaWeights, LoadedLinear } from '../model/types.ts';
import type { Tokenizer } from '../tokenizer/types.ts';
import { readLlama2cTokenizer } from '../tokenizer/llama2c.ts';
import { GGUF_MAGIC, readGguf } from './gguf.ts';
import { ggufToLlama, ggufTokenizer } from './gguf-llama.ts';
import { readLlama2c } from './llama2c.ts';

export type ModelFormat = 'llama2c' | 'gguf' | 'hf' | 'gptq';

export interface LoadedModel {
  /** Projections may still be in the file (FileLinear); LlamaModel.create reads them one at a time. */
  weights: LlamaWeights<LoadedLinear>;
  tokenizer: Tokenizer;
  format: ModelFormat;
}

export interface LoadOptions {
  /** A tokenizer file (tokenizer.bin, tokenizer.json, tokenizer.model, .gguf) overriding the one found with the model. */
  tokenizer?: string;
  /** Adapter settings of QuantLinear layers read from GPTQ (bits and group come from the file). */
  quantSettings?: Partial<QaloraSettings>;
}

function magic(path: string): number {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(4);
    return readSync(fd, b, 0, 4, 0) === 4 ? b.readUInt32LE(0) : -1;
  } finally {
    closeSync(fd);
  }
}

export function detectFormat(path: string): ModelFormat {
  if (!existsSync(path)) throw new QaloraError(`${path}: no such model file or directory`);
  if (statSync(path).isDirectory()) {
    if (existsSync(join(path, 'quantize_config.json'))) return 'gptq';
    if (existsSync(join(path, 'config.json'))) return 'hf';
    throw new QaloraError(`${path}: a model directory needs config.json (Hugging Face) or quantize_config.json (GPTQ)`);
  }
  if (magic(path) === GGUF_MAGIC) return 'gguf';
  if (extname(path) === '.safetensors' || extname(path) === '.json') {
    return existsSync(join(dirname(path), 'quantize_config.json')) ? 'gptq' : 'hf';
  }
  return 'llama2c';
}

/** Reads a tokenizer file of any supported kind; `vocab` is the model's vocabulary size when known. */
export async function loadTokenizer(path: string, vocab?: number): Promise<Tokenizer> {
  if (!existsSync(path)) throw new QaloraError(`${path}: no such tokenizer file`);
  let tok: Tokenizer;
  if (statSync(path).isDirectory() || extname(path) === '.json') {
    const { readHfTokenizer } = await import('../tokenizer/hf.ts');
    tok = readHfTokenizer(statSync(path).isDirectory() ? join(path, 'tokenizer.json') : path);
  } else if (magic(path) === GGUF_MAGIC) {
    tok = ggufTokenizer(readGguf(path));
  } else if (extname(path) === '.model') {
    const { readSentencePieceModel } = await import('../tokenizer/spm-model.ts');
    tok = readSentencePieceModel(path);
  } else {
    tok = readLlama2cTokenizer(path, vocab);
  }
  // A model may pad its embedding beyond the tokenizer (HF does, to multiples of 64); never the other way round.
  if (vocab !== undefined && tok.vocabSize > vocab) {
    throw new QaloraError(`${path}: tokenizer has ${tok.vocabSize} tokens but the model's vocabulary is only ${vocab}`);
  }
  return tok;
}

/** llama2.c keeps the tokenizer beside the model: tokenizer.bin, or tok<vocab>.bin as the tinyllamas do. */
function llama2cTokenizerBeside(model: string, vocab: number): string {
  const dir = dirname(model);
  for (const name of ['tokenizer.bin', `tok${vocab}.bin`]) if (existsSync(join(dir, name))) return join(dir, name);
  throw new QaloraError(`${model}: no tokenizer given and none beside the model (looked for tokenizer.bin, tok${vocab}.bin in ${dir}); pass --tokenizer`);
}

export async function loadModel(path: string, opts: LoadOptions = {}): Promise<LoadedModel> {
  const format = detectFormat(path);
  let weights: LlamaWeights<LoadedLinear>;
  let tokenizer: Tokenizer | undefined;
  switch (format) {
    case 'llama2c':
      weights = readLlama2c(path);
      if (!opts.tokenizer) tokenizer = readLlama2cTokenizer(llama2cTokenizerBeside(path, weights.config.vocab), weights.config.vocab);
      break;
    case 'gguf': {
      const f = readGguf(path);
      weights = ggufToLlama(f);
      if (!opts.tokenizer) {
        if (!f.metadata.has('tokenizer.ggml.tokens')) throw new QaloraError(`${path}: the GGUF file carries no tokenizer (tokenizer.ggml.*); pass --tokenizer`);
        tokenizer = ggufTokenizer(f);
      }
      break;
    }
    case 'hf': {
      const { readHfModel } = await import('./hf.ts');
      const dir = statSync(path).isDirectory() ? path : dirname(path);
      weights = readHfModel(dir);
      if (!opts.tokenizer) tokenizer = await hfTokenizerBeside(dir, weights.config.vocab);
      break;
    }
    case 'gptq': {
      const { readGptqModel } = await import('./gptq.ts');
      const dir = statSync(path).isDirectory() ? path : dirname(path);
      weights = readGptqModel(dir, { settings: opts.quantSettings });
      if (!opts.tokenizer) tokenizer = await hfTokenizerBeside(dir, weights.config.vocab);
      break;
    }
  }
  if (opts.tokenizer) tokenizer = await loadTokenizer(opts.tokenizer, weights.config.vocab);
  if (tokenizer!.vocabSize > weights.config.vocab) {
    throw new QaloraError(`${path}: tokenizer has ${tokenizer!.vocabSize} tokens but the model's vocabulary is only ${weights.config.vocab}`);
  }
  return { weights, tokenizer: tokenizer!, format };
}

async function hfTokenizerBeside(dir: string, vocab: number): Promise<Tokenizer> {
  for (const name of ['tokenizer.json', 'tokenizer.model', 'tokenizer.bin']) {
    if (existsSync(join(dir, name))) return loadTokenizer(join(dir, name), vocab);
  }
  throw new QaloraError(`${dir}: no tokenizer.json, tokenizer.model or tokenizer.bin in the model directory; pass --tokenizer`);
}
