// The nunjucks Environment every target renders with (trimBlocks + lstripBlocks: a block tag on its own line
// leaves no blank line). Compiling a template is nunjucks' slow part (tens of ms each, more than rendering),
// so compiled code is cached by template content, in memory and under node_modules/.cache, and recompiling
// an unchanged template set costs only the rendering.
import nunjucks from 'nunjucks';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const NUNJUCKS_VERSION: string = createRequire(import.meta.url)('nunjucks/package.json').version;
const ENV_OPTS = { autoescape: false, trimBlocks: true, lstripBlocks: true };
const codeCacheDir = resolve(dirname(fileURLToPath(import.meta.url)), '..', 'node_modules', '.cache', 'qalora-nunjucks');
const compiledCode = new Map<string, string>();
const nunjucksInternals = nunjucks as unknown as { compiler: { compile(src: string, asyncFilters: string[], ext: unknown[], name: string, opts: object): string } };

function compiledTemplate(name: string, text: string): string {
  const key = createHash('sha256').update(JSON.stringify([NUNJUCKS_VERSION, ENV_OPTS, name, text])).digest('hex');
  let code = compiledCode.get(key);
  if (code !== undefined) return code;
  const file = join(codeCacheDir, `${key}.js`);
  try {
    code = readFileSync(file, 'utf8');
  } catch {
    code = nunjucksInternals.compiler.compile(text, [], [], name, ENV_OPTS);
    try {
      mkdirSync(codeCacheDir, { recursive: true });
      const tmp = `${file}.${process.pid}.tmp`;
      writeFileSync(tmp, code);
      renameSync(tmp, file);
    } catch {
      /* a read-only checkout only loses the cache */
    }
  }
  compiledCode.set(key, code);
  return code;
}

class CachingLoader extends nunjucks.Loader {
  constructor(private readonly root: string) {
    super();
  }
  getSource(name: string) {
    const path = join(this.root, name);
    if (!existsSync(path)) return null as unknown as nunjucks.LoaderSource;
    // eslint-disable-next-line no-new-func
    const obj = new Function(compiledTemplate(name, readFileSync(path, 'utf8')))();
    return { src: { type: 'code', obj }, path, noCache: true } as unknown as nunjucks.LoaderSource;
  }
}

export function environment(root: string): nunjucks.Environment {
  const env = new nunjucks.Environment(new CachingLoader(root) as unknown as nunjucks.ILoader, ENV_OPTS);
  env.addFilter('json', (v: unknown) => JSON.stringify(v));
  env.addGlobal('wordsPerRow', (inFeatures: number, bits: number) => Math.ceil(inFeatures / 32) * bits);
  return env;
}

