// PEFT adapter files: key names, shapes and config fields as PEFT writes them; round trips; PEFT-written
// configs (no pooling recorded) and plain LoRA adapters load; bad files fail naming what is wrong.
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadPeftAdapter, peftKey, savePeftAdapter } from '../runtime/adapters/peft.ts';
import type { AdapterSet, LlamaConfig } from '../runtime/model/types.ts';
import { readSafetensors, tensorOf, writeSafetensors } from '../runtime/safetensors.ts';

const cfg: LlamaConfig = { dim: 64, hidden: 172, layers: 2, heads: 8, kvHeads: 4, vocab: 512, context: 512, ropeTheta: 10000, normEps: 1e-5, tiedClassifier: true };
const dir = mkdtempSync(join(tmpdir(), 'qalora-adapters-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function rand(n: number, seed: number): Float32Array {
  const a = new Float32Array(n);
  let s = seed;
  for (let i = 0; i < n; i++) { s = (s * 1103515245 + 12345) >>> 0; a[i] = (s / 2 ** 32) - 0.5; }
  return a;
}

// QA-LoRA on a stories260K-shaped model: group 32 for dim inputs (L = 2), group 43 for down (L = 4).
function qaloraSet(rank = 4): AdapterSet {
  const set: AdapterSet = [];
  for (let l = 0; l < cfg.layers; l++) {
    set.push({
      q: { rank, alpha: 16, a: rand(rank * 2, l * 10 + 1), b: rand(64 * rank, l * 10 + 2) },
      v: { rank, alpha: 16, a: rand(rank * 2, l * 10 + 3), b: rand(32 * rank, l * 10 + 4) },
      down: { rank, alpha: 16, a: rand(rank * 4, l * 10 + 5), b: rand(64 * rank, l * 10 + 6) },
    });
  }
  return set;
}

describe('PEFT adapters', () => {
  it('writes PEFT key names, shapes and config and reads them back exactly', () => {
    const out = join(dir, 'qa');
    const set = qaloraSet();
    savePeftAdapter(out, set, { kind: 'qalora', groups: { q: 32, v: 32, down: 43 }, pool: 'mean', dropout: 0.05, bits: 4 });
    const config = JSON.parse(readFileSync(join(out, 'adapter_config.json'), 'utf8'));
    expect(config).toMatchObject({
      peft_type: 'LORA', task_type: 'CAUSAL_LM', r: 4, lora_alpha: 16, lora_dropout: 0.05, use_qalora: true,
      qalora_group_size: 32, qalora_group_size_pattern: { down_proj: 43 }, qalora_pooling: 'mean',
      target_modules: ['q_proj', 'v_proj', 'down_proj'],
    });
    const st = readSafetensors(join(out, 'adapter_model.safetensors'));
    expect(st.tensors.get('base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight')!.shape).toEqual([4, 2]);
    expect(st.tensors.get('base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight')!.shape).toEqual([32, 4]);
    expect(st.tensors.get('base_model.model.model.layers.0.mlp.down_proj.lora_A.weight')!.shape).toEqual([4, 4]);
    expect(st.tensors.size).toBe(cfg.layers * 3 * 2);
    const back = loadPeftAdapter(out, { model: cfg });
    expect(back.kind).toBe('qalora');
    expect(back.pool).toBe('mean');
    expect(back.groups).toEqual({ q: 32, v: 32, down: 43 });
    for (let l = 0; l < cfg.layers; l++) {
      for (const p of ['q', 'v', 'down'] as const) {
        expect(Array.from(back.adapters[l][p]!.a)).toEqual(Array.from(set[l][p]!.a));
        expect(Array.from(back.adapters[l][p]!.b)).toEqual(Array.from(set[l][p]!.b));
        expect(back.adapters[l][p]!.alpha).toBe(16);
      }
      expect(back.adapters[l].k).toBeUndefined();
    }
  });

  it('reads a PEFT-written QA-LoRA config as PEFT pooling and warns about unknown fields', () => {
    const out = join(dir, 'peft');
    const A = rand(8 * 4, 1), B = rand(64 * 8, 2); // q_proj, qalora_group_size 16: in/g = 4
    mkdirSync(out, { recursive: true });
    writeSafetensors(join(out, 'adapter_model.safetensors'), {
      [peftKey(0, 'q', 'A')]: tensorOf('F32', [8, 4], A),
      [peftKey(0, 'q', 'B')]: tensorOf('F32', [64, 8], B),
    });
    writeFileSync(join(out, 'adapter_config.json'), JSON.stringify({
      peft_type: 'LORA', r: 8, lora_alpha: 16, lora_dropout: 0.1, target_modules: ['q_proj'], task_type: 'CAUSAL_LM',
      use_qalora: true, qalora_group_size: 16, some_future_field: 1,
    }));
    const warnings: string[] = [];
    const a = loadPeftAdapter(out, { model: cfg, warn: (m) => warnings.push(m) });
    expect(a.pool).toBe('peft');
    expect(a.groups.q).toBe(16);
    expect(warnings.join()).toMatch(/ignoring unknown field some_future_field/);
    expect(a.adapters.length).toBe(cfg.layers);
    expect(Array.from(a.adapters[0].q!.a)).toEqual(Array.from(A));
  });

  it('round-trips plain LoRA adapters (A over all inputs) and checks shapes against the model', () => {
    const out = join(dir, 'lora');
    const set: AdapterSet = [{ up: { rank: 2, alpha: 4, a: rand(2 * 64, 3), b: rand(172 * 2, 4) } }, {}];
    savePeftAdapter(out, set, { kind: 'lora', groups: {}, pool: 'mean', dropout: 0 });
    const cfgJson = JSON.parse(readFileSync(join(out, 'adapter_config.json'), 'utf8'));
    expect(cfgJson.use_qalora).toBe(false);
    expect(cfgJson.qalora_group_size).toBeUndefined();
    const back = loadPeftAdapter(out, { model: cfg });
    expect(back.kind).toBe('lora');
    expect(Array.from(back.adapters[0].up!.b)).toEqual(Array.from(set[0].up!.b));
    // The same file against a model with other shapes fails, naming the tensor.
    expect(() => loadPeftAdapter(out, { model: { ...cfg, hidden: 100 } })).toThrow(/up_proj.*lora_B has 172 rows but up_proj has 100 outputs/);
  });

  it('rejects mismatched QA-LoRA widths, missing halves and foreign tensors', () => {
    const out = join(dir, 'bad');
    savePeftAdapter(out, qaloraSet(), { kind: 'qalora', groups: { q: 32, v: 32, down: 43 }, pool: 'mean', dropout: 0 });
    const cfgPath = join(out, 'adapter_config.json');
    const good = readFileSync(cfgPath, 'utf8');
    writeFileSync(cfgPath, good.replace('"qalora_group_size": 32', '"qalora_group_size": 16'));
    expect(() => loadPeftAdapter(out, { model: cfg })).toThrow(/q_proj.*has 2 columns but q_proj with group 16 pools 64 inputs into 4/);
    writeFileSync(cfgPath, good);
    const st = readSafetensors(join(out, 'adapter_model.safetensors'));
    st.tensors.delete(peftKey(1, 'v', 'B'));
    writeSafetensors(join(out, 'adapter_model.safetensors'), st.tensors);
    expect(() => loadPeftAdapter(out)).toThrow(/layers\.1\.self_attn\.v_proj\.lora_A\.weight' has no matching/);
    st.tensors.delete(peftKey(1, 'v', 'A'));
    st.tensors.set('base_model.model.lm_head.weight', tensorOf('F32', [1], new Float32Array(1)));
    writeSafetensors(join(out, 'adapter_model.safetensors'), st.tensors);
    expect(() => loadPeftAdapter(out)).toThrow(/unexpected tensor 'base_model\.model\.lm_head\.weight'/);
    expect(() => loadPeftAdapter(join(dir, 'nowhere'))).toThrow(/not an adapter directory/);
  });
});
