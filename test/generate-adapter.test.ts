// `qalora generate --spec --adapter`: the CLI runs the quantized base plus a saved adapter and prints what the
// same model generates in process; and the adapter really changes the text.
import { execFileSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadSpecOrFail } from '../compiler/spec-file.ts';
import { savePeftAdapter } from '../runtime/adapters/peft.ts';
import { loadModel } from '../runtime/formats/load.ts';
import { generate } from '../runtime/model/generate.ts';
import { LlamaModel } from '../runtime/model/llama.ts';
import { fixture, repoRoot } from './fixtures.ts';

const MODEL = 'models/stories260K/stories260K.bin';

describe('generate with a quantized base and an adapter', () => {
  it('the CLI prints what the model with that adapter generates', async () => {
    const specFile = join(repoRoot, 'specs/stories260k.qal');
    const spec = loadSpecOrFail(specFile);
    const { weights, tokenizer } = await loadModel(fixture(MODEL));
    const model = await LlamaModel.create(weights, { backend: 'cpu', spec, seed: 1 });
    const opts = { prompt: 'Once upon a time', steps: 60, temperature: 0 };
    const plain = generate(model, tokenizer, opts).text;
    // A trained adapter's B is not zero: a deterministic, small one changes the text.
    let k = 0;
    for (const set of model.adapters) for (const ad of Object.values(set)) for (let i = 0; i < ad!.b.length; i++) ad!.b[i] = 0.2 * Math.sin(++k);
    const adapted = generate(model, tokenizer, opts).text;
    expect(adapted).not.toBe(plain);
    const dir = join(mkdtempSync(join(tmpdir(), 'qalora-adapter-')), 'adapter');
    const groups = Object.fromEntries(spec.layers.map((l) => [l.projection!, l.group]));
    savePeftAdapter(dir, model.adapters, { kind: 'qalora', groups, pool: 'mean', dropout: 0.05, bits: 4 });
    const stdout = execFileSync(process.execPath, [join(repoRoot, 'bin/qalora.mjs'), 'generate', '--model', fixture(MODEL), '--spec', specFile,
      '--adapter', dir, '-t', '0', '-n', '60', '--prompt', 'Once upon a time'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    expect(stdout).toBe(adapted + '\n');
  });
});
