// The files `qalora demo` runs on by default, shipped inside the repository (assets/demo/README.md gives their
// source, licence and sha256) so that a clone needs nothing beside it. Resolved from this file, not the working
// directory, so the demo runs from anywhere.
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const dir = join(repoRoot, 'assets', 'demo');

export const demoAssets = {
  /** stories260K (llama2.c format); its tokenizer tok512.bin sits beside it, where the loaders look. */
  model: join(dir, 'stories260K.bin'),
  tokenizer: join(dir, 'tok512.bin'),
  data: join(dir, 'tinyshakespeare.txt'),
  spec: join(repoRoot, 'specs', 'stories260k.qal'),
};
