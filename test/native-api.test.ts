// runtime/native-api.ts is emitted, not written (nor committed): it must be what compiler/native-api.ts makes of
// the current op descriptors, so the runtime's types are the addon's (`npm ci` writes it; `npm run gen:api`
// refreshes it after a descriptor changed). A spec's bindings start with the same declarations.
import { existsSync, readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { NATIVE_API_PATH, emitNativeApi, nativeApiFile } from '../compiler/native-api.ts';
import { loadOpDescriptors } from '../compiler/ops.ts';
import { defaultTemplateRoot } from '../compiler/render.ts';

describe('runtime/native-api.ts', () => {
  it('is what the generator emits from the descriptors (run `npm run gen:api` after changing an op)', () => {
    expect(existsSync(NATIVE_API_PATH), 'runtime/native-api.ts is missing: npm run gen:api').toBe(true);
    expect(readFileSync(NATIVE_API_PATH, 'utf8')).toBe(nativeApiFile());
  });

  it('declares every descriptor\'s op, its arrays as host arrays or device tensors of their dtype', () => {
    const text = emitNativeApi(loadOpDescriptors(defaultTemplateRoot), { addonAlias: true });
    expect(text).toContain("  rmsnorm_forward(x: Tensor<'f32'>, w: Tensor<'f32'>, y: Tensor<'f32'>, rstd: Tensor<'f32'>, rows: number, dim: number, eps: number): void;");
    expect(text).toContain("  cross_entropy_forward(logits: Tensor<'f32'>, targets: Tensor<'i32'>, n: number, vocab: number): number;");
    // The casts run on the GPU backends too (the model keeps its activations there).
    expect(text).toMatch(/export type GpuCoreOps = Pick<CoreOps, [^>]*'f32_to_f16'[^>]*'bf16_to_f32'/);
  });
});
