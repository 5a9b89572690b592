// What `qalora serve` loads: the model (merged, or a base with its spec), the adapters served beside it by
// name (vLLM's --lora-modules name=path), the chat template; and the server wired to an engine over them.
import { basename, extname } from 'node:path';
import type { Pool, ResolvedSpec, TableType } from '../../dsl/resolved.ts';
import { openAdapterFor, readAdapter } from '../adapters/open.ts';
import { QaloraError } from '../errors.ts';
import { checkAdapters } from '../model/adapters.ts';
import type { AdapterSet, BackendName, LlamaWeights, ProjectionName } from '../model/types.ts';
import { openForRun, recordedRunInfo, tokenizerSource } from '../train/setup.ts';
import { findChatTemplate } from './chat-template.ts';
import { Engine } from './engine.ts';
import { QaloraServer } from './server.ts';
import { announceImpliedSpec } from '../cli/report.ts';

export interface ServeOptions {
  model: string;
  tokenizer?: string;
  spec?: string | ResolvedSpec;
  /** name=dir pairs. */
  loras?: string[];
  backend?: BackendName;
  /** The decode GEMVs' activations (CreateOptions.activations). */
  activations?: 'fp32' | 'int8';
  /** The token tables' type (CreateOptions.tables). */
  tables?: TableType;
  chatTemplate?: string;
  modelName?: string;
  apiKey?: string;
  parallel?: number;
  maxQueue?: number;
  maxBodyBytes?: number;
}

export function parseLora(arg: string): { name: string; dir: string } {
  const at = arg.indexOf('=');
  const name = arg.slice(0, at), dir = arg.slice(at + 1);
  if (at <= 0 || !dir) throw new QaloraError(`--lora ${arg}: expected NAME=DIR (e.g. --lora shakespeare=runs/s1/adapter)`);
  if (!/^[\w.:\-/]+$/.test(name)) throw new QaloraError(`--lora ${arg}: the name '${name}' may use only letters, digits and _ . : - /`);
  return { name, dir };
}

/** Loads everything and returns a server ready to listen. */
export async function createQaloraServer(o: ServeOptions): Promise<QaloraServer> {
  const loras = (o.loras ?? []).map(parseLora);
  const baseName = o.modelName ?? basename(o.model, extname(o.model));
  const names = new Set([baseName]);
  for (const l of loras) {
    if (names.has(l.name)) throw new QaloraError(`--lora ${l.name}=${l.dir}: the name '${l.name}' is already taken${l.name === baseName ? ' by the base model (see --model-name)' : ''}`);
    names.add(l.name);
  }
  const needsSpec = '--lora needs a QA-LoRA model: give --spec (or a merged/quantized model that records one)';
  // A GGUF file's Q4_x/Q8_0 blocks imply a spec; whether they do is known once it has loaded (checked below).
  if (loras.length && !o.spec && !recordedRunInfo(o.model).spec && !o.model.endsWith('.gguf')) throw new QaloraError(needsSpec);
  const adapterError = (l: { name: string; dir: string }, e: unknown) => new QaloraError(`--lora ${l.name}=${l.dir}: ${(e as Error).message}`);
  // Unreadable adapters fail before the model loads (which may take minutes on a large one). Plain LoRA
  // (PEFT without use_qalora, or a llama.cpp LoRA GGUF) is folded into the base's groups once it has loaded.
  for (const l of loras) {
    try {
      readAdapter(l.dir, { warn: () => {} });
    } catch (e) {
      throw adapterError(l, e);
    }
  }
  const { model, tokenizer, impliedSpec } = await openForRun({ model: o.model, tokenizer: o.tokenizer, spec: o.spec, backend: o.backend ?? 'cpu', inferred: { rank: 0 }, activations: o.activations, tables: o.tables });
  announceImpliedSpec(impliedSpec);
  if (loras.length && !model.spec) throw new QaloraError(needsSpec);
  const adapters = new Map<string, AdapterSet>();
  for (const l of loras) {
    try {
      const info = openAdapterFor(l.dir, model.weights);
      checkAdapters(model.weights, info.adapters);
      if (!info.folded) checkPooling(model.weights, info.adapters, info.pool);
      adapters.set(l.name, info.adapters);
    } catch (e) {
      throw adapterError(l, e);
    }
  }
  const chatTemplate = await findChatTemplate([o.model, tokenizerSource(o.model, o.tokenizer)], o.chatTemplate);
  const engine = new Engine(model, tokenizer, adapters, { parallel: o.parallel ?? 8, maxQueue: o.maxQueue ?? 64 });
  return new QaloraServer({
    engine, tokenizer, chatTemplate, baseName, adapterNames: [...adapters.keys()], apiKey: o.apiKey, maxBodyBytes: o.maxBodyBytes,
  });
}

/** The pooled input an adapter was trained on must be the one the base's kernels compute (notes §1: PEFT differs). */
function checkPooling(weights: LlamaWeights, adapters: AdapterSet, pool: Pool): void {
  adapters.forEach((set, l) => {
    for (const [p, ad] of Object.entries(set)) {
      const lin = weights.blocks[l].proj[p as ProjectionName];
      if (ad && lin.kind === 'quant' && lin.settings.pool !== pool) {
        throw new QaloraError(`layers.${l}.${p}: the adapter was trained with '${pool}' pooling but the model's spec pools '${lin.settings.pool}'`);
      }
    }
  });
}
