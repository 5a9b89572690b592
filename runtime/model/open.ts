// Opening a runnable model from files, as the CLI commands (generate, quantize, eval, serve, …) need it:
// checkpoint (any format loadModel reads, or our quantized base), tokenizer, spec, adapter, backend.
import type { ResolvedSpec } from '../../dsl/resolved.ts';
import { QaloraError } from '../errors.ts';
import type { Tokenizer } from '../tokenizer/types.ts';
import { LlamaModel, type CalibrationSource, type CreateOptions } from './llama.ts';
import { describeSpec } from './prepare.ts';
import { isQuantizedBase, loadQuantizedBase } from './basefile.ts';
import type { AdapterSet, BackendName, LlamaWeights, LoadedLinear } from './types.ts';
import { checkAdapters } from './adapters.ts';


export interface OpenOptions {
  model: string;
  tokenizer?: string;
  /** A spec file path or an already loaded spec. */
  spec?: string | ResolvedSpec;
  /** An adapter to start from: a QA-LoRA PEFT directory, or a plain LoRA (PEFT, llama.cpp GGUF) that folds into the base's groups. */
  adapter?: string;
  backend?: BackendName;
  quantize?: 'rtn' | 'gptq';
  /** Calibration token sequences for GPTQ (or a function building them once the tokenizer is known). */
  calib?: CalibrationSource | ((tok: Tokenizer, config: LlamaWeights['config']) => CalibrationSource);
  seed?: number;
  /** Adapter settings for a quantized file opened without a spec (LlamaModel CreateOptions.inferred). */
  inferred?: CreateOptions['inferred'];
  /** Re-quantize file blocks whose bits or group differ from the spec's (lossy) instead of failing. */
  requantize?: boolean;
  onProgress?: (done: number, total: number, what: string) => void;
  profile?: CreateOptions['profile'];
  activations?: CreateOptions['activations'];
  tables?: CreateOptions['tables'];
  checkpointing?: CreateOptions['checkpointing'];
}

export interface OpenedModel {
  model: LlamaModel;
  tokenizer: Tokenizer;
  weights: LlamaWeights;
  /** Set when no spec was given and the file's quantized blocks implied one: what runs, one line per projection. */
  impliedSpec?: string;
}

export async function openModel(o: OpenOptions): Promise<OpenedModel> {
  const backend = o.backend ?? 'cpu';
  let spec: ResolvedSpec | undefined;
  if (typeof o.spec === 'string') {
    const { loadSpecOrFail } = await import('../../compiler/spec-file.ts');
    spec = loadSpecOrFail(o.spec);
  } else {
    spec = o.spec;
  }
  let weights: LlamaWeights<LoadedLinear>, tokenizer: Tokenizer;
  const { loadModel, loadTokenizer } = await import('../formats/load.ts');
  if (o.model.endsWith('.safetensors') && isQuantizedBase(o.model)) {
    weights = loadQuantizedBase(o.model).weights;
    if (!o.tokenizer) throw new QaloraError(`${o.model}: a quantized base carries no tokenizer; pass --tokenizer`);
    tokenizer = await loadTokenizer(o.tokenizer, weights.config.vocab);
  } else {
    const loaded = await loadModel(o.model, { tokenizer: o.tokenizer });
    weights = loaded.weights;
    tokenizer = loaded.tokenizer;
  }
  // The adapter is read before the (possibly long) load of the base, so a bad one fails first; it is put on the
  // model once the base is quantized, because a plain LoRA folds into the quantized layers' groups.
  let adapters: AdapterSet | undefined;
  if (o.adapter) {
    const { readAdapter } = await import('../adapters/open.ts');
    readAdapter(o.adapter, { model: weights.config });
    adapters = weights.blocks.map(() => ({}));
  }
  const calib = typeof o.calib === 'function' ? o.calib(tokenizer, weights.config) : o.calib;
  const model = await LlamaModel.create(weights, {
    backend, spec, adapters, quantize: o.quantize, calib, seed: o.seed, onProgress: o.onProgress, inferred: o.inferred, requantize: o.requantize,
    profile: o.profile, activations: o.activations, tables: o.tables,
    checkpointing: o.checkpointing,
  });
  if (o.adapter) {
    const { openAdapterFor } = await import('../adapters/open.ts');
    const opened = openAdapterFor(o.adapter, model.weights);
    checkAdapters(model.weights, opened.adapters);
    model.adapters = opened.adapters;
  }
  const impliedSpec = !spec && model.spec ? describeSpec(model.spec) : undefined;
  return { model, tokenizer, weights: model.weights, impliedSpec };
}
