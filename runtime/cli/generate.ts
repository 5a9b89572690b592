// `qalora generate`: stream text from a model as llama2.c's `run` does (prompt, then continuation), on the float
// model or, with --spec, on its quantized base (plus an adapter); prefill and decode speed go to stderr.
import { Option, type Command } from 'commander';
import { QaloraError } from '../errors.ts';
import { generate } from '../model/generate.ts';
import { openModel } from '../model/open.ts';
import { OpProfile } from '../model/profile.ts';
import type { BackendName } from '../model/types.ts';
import { activationsOption, requantizeOption, tablesOption } from './options.ts';
import type { TableType } from '../../dsl/resolved.ts';
import { announceImpliedSpec, reportPeakMemory } from './report.ts';

interface GenerateFlags {
  model: string;
  tokenizer?: string;
  spec?: string;
  adapter?: string;
  prompt?: string;
  steps?: string;
  maxTokens?: string;
  temperature: string;
  topP: string;
  topK: string;
  repetitionPenalty: string;
  seed?: string;
  backend: BackendName;
  quantize: 'rtn' | 'gptq';
  requantize?: boolean;
  activations: 'fp32' | 'int8';
  tables?: TableType;
  profile?: boolean;
}

export function number(flag: string, text: string, integer = false): number {
  const v = Number(text);
  if (text.trim() === '' || !Number.isFinite(v) || (integer && !Number.isInteger(v))) {
    throw new QaloraError(`${flag} expects ${integer ? 'an integer' : 'a number'}, got '${text}'`);
  }
  return v;
}

export function register(program: Command): void {
  program
    .command('generate')
    .description('generate text from a model (float, or the spec\'s quantized base plus an adapter), streaming like llama2.c\'s run')
    .requiredOption('-m, --model <path>', 'checkpoint: llama2.c .bin, GGUF, HF or GPTQ directory, or a quantized base (.safetensors)')
    .option('-z, --tokenizer <path>', 'tokenizer file (default: the one in or beside the model)')
    .option('--spec <file>', 'QA-LoRA spec: run the quantized base (float layers are quantized on load; a quantized model carries its own settings)')
    .option('--adapter <dir>', 'adapter directory (PEFT layout) to apply to the quantized base')
    .option('-i, --prompt <text>', 'prompt (default: empty, i.e. start from BOS)')
    .option('-n, --steps <n>', 'positions in all, BOS and prompt included (llama2.c -n; 0 = the context length)')
    .option('--max-tokens <n>', 'new tokens to generate (instead of -n)')
    .option('-t, --temperature <t>', '0 = greedy', '1')
    .option('-p, --top-p <p>', 'nucleus sampling mass (0 or 1 = off)', '0.9')
    .option('-k, --top-k <k>', 'keep only the k most likely tokens (0 = off)', '0')
    .option('--repetition-penalty <r>', 'penalise tokens already present (1 = off)', '1')
    .option('-s, --seed <s>', 'random seed (default: time)')
    .addOption(new Option('--backend <name>', 'kernels for the QA-LoRA layers').choices(['cpu', 'cuda', 'emu']).default('cpu'))
    .addOption(new Option('--quantize <method>', 'how float layers are quantized into the spec').choices(['rtn', 'gptq']).default('rtn'))
    .addOption(requantizeOption())
    .addOption(activationsOption())
    .addOption(tablesOption())
    .option('--profile', "time every op of each decoded token and print where a token's time goes (stderr)")
    .action(async (o: GenerateFlags) => {
      if (o.steps !== undefined && o.maxTokens !== undefined) throw new QaloraError('give -n or --max-tokens, not both');
      if (o.quantize === 'gptq') throw new QaloraError('generate quantizes with rtn; make a GPTQ base once with `qalora quantize --method gptq` and pass it as --model');
      const profile = o.profile ? new OpProfile() : undefined;
      const { model, tokenizer, impliedSpec } = await openModel({
        model: o.model, tokenizer: o.tokenizer, spec: o.spec, adapter: o.adapter, backend: o.backend, quantize: o.quantize,
        requantize: o.requantize, inferred: { rank: 0 }, activations: o.activations, tables: o.tables, profile,
      });
      announceImpliedSpec(impliedSpec);
      const out = process.stdout;
      const r = generate(model, tokenizer, {
        prompt: o.prompt,
        steps: o.steps === undefined ? undefined : number('-n', o.steps, true),
        maxTokens: o.maxTokens === undefined ? undefined : number('--max-tokens', o.maxTokens, true),
        temperature: number('--temperature', o.temperature),
        topP: number('--top-p', o.topP),
        topK: number('--top-k', o.topK, true),
        repetitionPenalty: number('--repetition-penalty', o.repetitionPenalty),
        seed: o.seed === undefined ? undefined : number('--seed', o.seed, true),
        onText: (t) => out.write(t),
        profile,
      });
      out.write('\n');
      const rate = (n: number, s: number) => (s > 0 ? (n / s).toFixed(1) : '-');
      process.stderr.write(
        `prefill: ${r.promptTokens} tokens, ${rate(r.promptTokens, r.prefillSeconds)} tok/s; ` +
          `decode: ${r.newTokens} tokens, ${rate(r.newTokens, r.decodeSeconds)} tok/s (${o.backend}, ${model.spec ? 'quantized' : 'float'}${o.activations === 'int8' ? ', int8 activations' : ''})\n`,
      );
      if (profile) process.stderr.write(profile.table('token') + '\n');
      reportPeakMemory();
    });
}
