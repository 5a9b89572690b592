// The LLaMA model runtime: forward for training (batched, causal), forward for generation (prefill + KV cache),
// backward to the QA-LoRA adapters (W frozen), and quantizing a float model into a spec's layers.
// Every tensor op runs natively (addon.core.* and the spec's kernels); this file is the orchestration.
//
// Public surface used by train/, merge, export/ and serve/: keep it stable.

import type { QaloraSettings, ResolvedSpec, TableType } from '../../dsl/resolved.ts';
import type { AdapterSet, BackendName, LlamaConfig, LlamaWeights, LoadedLinear } from './types.ts';
import { QaloraError } from '../errors.ts';
import { Runner, type ActivationMode, type Checkpointing, type RunnerOptions } from './runner.ts';
import { KvSession } from './session.ts';
import { prepareWeights, type CalibrationSource } from './prepare.ts';
import type { OpProfile } from './profile.ts';
import type { F32, Memory } from './memory.ts';
import type { CoreOps } from './native-ops.ts';

export type { CalibrationSource } from './prepare.ts';

export interface CreateOptions {
  /** Which kernels run the QA-LoRA layers ('cpu', 'cuda' or 'emu'); core ops run on the CPU addon. */
  backend: BackendName;
  /**
   * The QA-LoRA spec. Float linear layers whose projection the spec names are quantized into its layout
   * (bits, group) on create(); layers already quantized (a reloaded base, a GPTQ checkpoint) are kept and must
   * match it. Without a spec the model runs as loaded (float, or quant layers with the settings they carry).
   */
  spec?: ResolvedSpec;
  /** Adapters to start from (e.g. a saved fine-tune); default: fresh ones for every layer with rank > 0. */
  adapters?: AdapterSet;
  /** How to quantize float layers into the spec: 'rtn' (min-max round to nearest, default) or 'gptq'. */
  quantize?: 'rtn' | 'gptq';
  /** Calibration data for 'gptq': token sequences the float model is run on to collect layer inputs. */
  calib?: CalibrationSource;
  /** Seed of the adapters' Xavier-uniform A init (B starts at zero). Default 0. */
  seed?: number;
  /**
   * Adapter settings of projections whose file stores exact blocks (GGUF Q4_0/Q4_1/Q8_0) when no spec is given:
   * over the defaults (rank 64, alpha 16, …). Inference without an adapter passes { rank: 0 }.
   */
  inferred?: Partial<QaloraSettings>;
  /** File blocks whose bits or group differ from the spec's are an error unless this is set: then they are dequantized and quantized again. */
  requantize?: boolean;
  /** Called as quantization proceeds (layer index, total layers), e.g. for a progress bar. */
  onProgress?: (done: number, total: number, what: string) => void;
  /** Time every op of training steps into this (`train --profile`). */
  profile?: OpProfile;
  /** The activations of inference's GEMVs: 'fp32' (exact, default) or 'int8' (CPU only; see ActivationMode). */
  activations?: ActivationMode;
  /** The token tables' type for both (`--tables`), over the spec's `tables`; absent: the spec's, else the file's. */
  tables?: TableType;
  /** Training's activation checkpointing (`train --gradient-checkpointing`); default 'auto'. */
  checkpointing?: Checkpointing;
}

export interface LossOptions {
  /** 1 = score this target, 0 = ignore (e.g. prompt tokens). Same length as targets. */
  mask?: Uint8Array;
}

export interface GradOptions extends LossOptions {
  /** Apply adapter dropout (the spec's per-layer dropout). Default false. */
  training?: boolean;
  /** Dropout stream seed; vary it per step. Default 0. */
  seed?: number;
}

/** A generation stream with its own KV cache. Logits returned are views valid until the next call on it. */
export interface InferenceSession {
  /** Feed ids at positions pos, pos+1, …; returns the logits [vocab] after the last one. */
  prefill(ids: number[] | Int32Array): Float32Array;
  /** Feed one id at position pos; returns its next-token logits [vocab]. */
  step(id: number): Float32Array;
  /** Number of positions already in the cache. */
  readonly pos: number;
  /** Forget the cache (pos = 0). */
  reset(): void;
  /** Drop positions ≥ n (keep a common prefix). */
  truncate(n: number): void;
}

/** Training on a GPU backend's tensors (LlamaModel.trainingOnBackend): the trainer's view of them. */
export interface BackendTraining {
  /** Every adapter's A then B, flat in paramList order, on the backend. */
  readonly params: F32;
  readonly core: CoreOps;
  readonly mem: Memory;
  /** Loss and the gradient of every parameter, flat like params (the backend's buffer, overwritten by the next call). */
  lossAndGrad(tokens: Int32Array, targets: Int32Array, batch: number, seqLen: number, opts?: GradOptions): { loss: number; count: number; grads: F32 };
  /** The backend's adapter values into model.adapters (checkpoints). */
  pull(): void;
  /** pull(), and the host arrays are the adapters' authority again. */
  end(): void;
}

export class LlamaModel {
  readonly config: LlamaConfig;
  /** The weights the model runs: quant layers after create() quantized them. */
  readonly weights: LlamaWeights;
  /** The spec the model runs (given, or implied by a quantized model's stored settings; undefined: float model). */
  readonly spec?: ResolvedSpec;
  readonly backend: BackendName;
  /** A/B arrays per block and projection: the optimizer updates these in place; the next call sees them. */
  adapters: AdapterSet;
  private readonly runner: Runner;

  private constructor(weights: LlamaWeights, adapters: AdapterSet, runner: Runner, spec: ResolvedSpec | undefined, backend: BackendName) {
    this.config = weights.config;
    this.weights = weights;
    this.adapters = adapters;
    this.runner = runner;
    this.spec = spec;
    this.backend = backend;
  }

  /** The activations of inference's GEMVs (CreateOptions.activations); may be switched between calls. */
  get activations(): ActivationMode {
    return this.runner.opts.activations ?? 'fp32';
  }

  set activations(mode: ActivationMode) {
    checkActivations(mode, this.backend);
    this.runner.opts.activations = mode;
  }

  /** Build a model: load the native ops, quantize float layers into the spec, initialise adapters. */
  static async create(weights: LlamaWeights<LoadedLinear>, opts: CreateOptions): Promise<LlamaModel> {
    checkActivations(opts.activations ?? 'fp32', opts.backend); // before the (possibly long) preparation
    const prepared = await prepareWeights(weights, opts);
    const runnerOpts: RunnerOptions = { backend: opts.backend, profile: opts.profile, activations: opts.activations, checkpointing: opts.checkpointing };
    const runner = new Runner(prepared.weights, prepared.native, runnerOpts);
    return new LlamaModel(prepared.weights, prepared.adapters, runner, prepared.spec, opts.backend);
  }

  /** Sum of next-token cross-entropy over unmasked targets (tokens/targets are [batch, seqLen], row-major). */
  loss(tokens: Int32Array, targets: Int32Array, batch: number, seqLen: number, opts: LossOptions = {}): { loss: number; count: number } {
    this.checkBatch(tokens, targets, batch, seqLen, opts.mask);
    return this.runner.loss(this.adapters, tokens, targets, batch, seqLen, opts.mask);
  }

  /**
   * Loss (sum over unmasked targets) and its gradient w.r.t. every adapter's A and B. The returned grads are
   * the model's own buffers, overwritten by the next call: copy them if you keep them.
   */
  lossAndGrad(tokens: Int32Array, targets: Int32Array, batch: number, seqLen: number, opts: GradOptions = {}): { loss: number; count: number; grads: AdapterSet } {
    this.checkBatch(tokens, targets, batch, seqLen, opts.mask);
    return this.runner.lossAndGrad(this.adapters, tokens, targets, batch, seqLen, opts);
  }

  /** Logits [batch·seqLen, vocab] for every position (causal, no cache). */
  logits(tokens: Int32Array, batch: number, seqLen: number): Float32Array {
    this.checkBatch(tokens, undefined, batch, seqLen, undefined);
    return this.runner.logits(this.adapters, tokens, batch, seqLen);
  }

  /**
   * Training whose state stays on the backend (cuda, emu): undefined on the cpu. From this call until end(), the
   * backend's copy of the adapters is theirs to update and the host arrays (this.adapters) are stale until pull().
   */
  trainingOnBackend(): BackendTraining | undefined {
    const r = this.runner;
    if (!r.mem.device) return undefined;
    const params = r.deviceAdapters(this.adapters);
    return {
      params,
      core: r.core,
      mem: r.mem,
      lossAndGrad: (tokens, targets, batch, seqLen, opts = {}) => {
        this.checkBatch(tokens, targets, batch, seqLen, opts.mask);
        const { loss, count, flat } = r.lossAndGrad(this.adapters, tokens, targets, batch, seqLen, { ...opts, gradsOnBackend: true });
        return { loss, count, grads: flat };
      },
      pull: () => r.pullAdapters(),
      end: () => {
        r.pullAdapters();
        r.hostAuthority();
      },
    };
  }

  /** A new generation stream (KV cache of config.context positions). */
  newSession(): InferenceSession {
    return new KvSession(this.runner, () => this.adapters);
  }

  /** One decode step for several sessions at once (the linear layers run batched): logits per session. */
  stepBatch(sessions: InferenceSession[], ids: number[]): Float32Array[] {
    if (sessions.length !== ids.length) throw new QaloraError(`stepBatch: ${sessions.length} sessions but ${ids.length} ids`);
    const own = sessions.map((s, i) => {
      if (!(s instanceof KvSession) || s.runner !== this.runner) throw new QaloraError(`stepBatch: session ${i} belongs to another model`);
      return s;
    });
    return KvSession.stepBatch(this.runner, this.adapters, own, ids);
  }

  private checkBatch(tokens: Int32Array, targets: Int32Array | undefined, batch: number, seqLen: number, mask: Uint8Array | undefined): void {
    const n = batch * seqLen;
    if (!Number.isInteger(batch) || !Number.isInteger(seqLen) || batch < 1 || seqLen < 1) throw new QaloraError(`batch (${batch}) and seqLen (${seqLen}) must be positive integers`);
    if (seqLen > this.config.context) throw new QaloraError(`seqLen ${seqLen} exceeds the model's context ${this.config.context}`);
    if (tokens.length !== n) throw new QaloraError(`tokens has ${tokens.length} entries, expected batch·seqLen = ${n}`);
    if (targets && targets.length !== n) throw new QaloraError(`targets has ${targets.length} entries, expected batch·seqLen = ${n}`);
    if (mask && mask.length !== n) throw new QaloraError(`mask has ${mask.length} entries, expected batch·seqLen = ${n}`);
    const v = this.config.vocab;
    for (let i = 0; i < n; i++) {
      if (tokens[i] < 0 || tokens[i] >= v) throw new QaloraError(`tokens[${i}] = ${tokens[i]} is outside the vocabulary [0, ${v})`);
      if (targets && (targets[i] < 0 || targets[i] >= v) && !(mask && mask[i] === 0)) throw new QaloraError(`targets[${i}] = ${targets[i]} is outside the vocabulary [0, ${v})`);
    }
  }
}

function checkActivations(mode: ActivationMode, backend: BackendName): void {
  if (mode !== 'fp32' && mode !== 'int8') throw new QaloraError(`activations must be 'fp32' or 'int8', got '${String(mode)}'`);
  if (mode === 'int8' && backend !== 'cpu') {
    throw new QaloraError(`int8 activations are a mode of the CPU kernels; the '${backend}' backend runs fp32 activations`);
  }
}
