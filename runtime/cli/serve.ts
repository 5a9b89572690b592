// `qalora serve`: an OpenAI-compatible HTTP server for a merged INT-b model, or a QA-LoRA base plus adapters
// chosen per request by `model` (unmerged). SIGTERM/SIGINT: stop accepting, finish or cancel within a deadline.
import { Option, type Command } from 'commander';
import { QaloraError } from '../errors.ts';
import type { BackendName } from '../model/types.ts';
import { createQaloraServer } from '../serve/load.ts';
import { number } from './generate.ts';
import { activationsOption, tablesOption } from './options.ts';
import type { TableType } from '../../dsl/resolved.ts';
import { reportPeakMemory } from './report.ts';

interface ServeFlags {
  model: string;
  tokenizer?: string;
  spec?: string;
  lora: string[];
  modelName?: string;
  chatTemplate?: string;
  host: string;
  port: string;
  apiKey?: string;
  parallel: string;
  maxQueue: string;
  maxBody: string;
  shutdownTimeout: string;
  backend: BackendName;
  activations: 'fp32' | 'int8';
  tables?: TableType;
}

export function register(program: Command): void {
  program
    .command('serve')
    .description('serve a model over the OpenAI HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)')
    .requiredOption('-m, --model <path>', 'merged model (qalora .safetensors), or any checkpoint `generate` reads')
    .option('-z, --tokenizer <path>', 'tokenizer file (default: the one in, beside or recorded with the model)')
    .option('--spec <file>', 'QA-LoRA spec: run the quantized base (needed for --lora unless the model records it)')
    .option('--lora <name=dir>', 'serve an adapter under this model name, unmerged: QA-LoRA (PEFT directory) or plain LoRA (PEFT directory or llama.cpp LoRA GGUF, folded onto the QA-LoRA layers); repeatable', (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option('--model-name <name>', 'name of the model as loaded in `model` (default: the file name without extension)')
    .option('--chat-template <file>', 'Jinja chat template (default: the model\'s own, else messages joined by newlines)')
    .option('--host <addr>', 'address to bind', '127.0.0.1')
    .option('--port <n>', 'port (0: any free one)', '8080')
    .option('--api-key <key>', 'require "Authorization: Bearer <key>" on everything but /health (default: $QALORA_API_KEY)')
    .option('--parallel <n>', 'sequences decoded together (KV-cache slots)', '8')
    .option('--max-queue <n>', 'requests allowed to wait for a slot; beyond that: 429 with Retry-After', '64')
    .option('--max-body <bytes>', 'largest request body (413 beyond)', String(4 << 20))
    .option('--shutdown-timeout <s>', 'on SIGTERM, seconds to let running requests finish before cancelling them', '10')
    .addOption(new Option('--backend <name>', 'kernels for the QA-LoRA layers').choices(['cpu', 'cuda', 'emu']).default('cpu'))
    .addOption(activationsOption())
    .addOption(tablesOption())
    .action(async (o: ServeFlags) => {
      const port = number('--port', o.port, true);
      if (port < 0 || port > 65535) throw new QaloraError(`--port ${o.port}: expected 0 to 65535`);
      const positive = (flag: string, v: string, min: number) => {
        const n = number(flag, v, true);
        if (n < min) throw new QaloraError(`${flag} ${v}: expected an integer ≥ ${min}`);
        return n;
      };
      const deadline = number('--shutdown-timeout', o.shutdownTimeout);
      if (deadline < 0) throw new QaloraError(`--shutdown-timeout ${o.shutdownTimeout}: expected seconds ≥ 0`);
      const apiKey = o.apiKey ?? (process.env.QALORA_API_KEY || undefined);
      const server = await createQaloraServer({
        model: o.model, tokenizer: o.tokenizer, spec: o.spec, loras: o.lora, backend: o.backend, activations: o.activations, tables: o.tables, chatTemplate: o.chatTemplate,
        modelName: o.modelName, apiKey, parallel: positive('--parallel', o.parallel, 1), maxQueue: positive('--max-queue', o.maxQueue, 0),
        maxBodyBytes: positive('--max-body', o.maxBody, 1),
      });
      let addr;
      try {
        addr = await server.listen(port, o.host);
      } catch (e) {
        throw new QaloraError(`cannot listen on ${o.host}:${port}: ${(e as Error).message}`);
      }
      const names = [server.opts.baseName, ...(server.opts.adapterNames ?? [])].join(', ');
      const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
      process.stdout.write(`qalora serve: listening on http://${host}:${addr.port}/v1 (models: ${names}; chat template: ${server.opts.chatTemplate.source}` +
        `${apiKey ? '; API key required' : ''})\n`);
      reportPeakMemory(); // after loading: what the model costs before any request
      await new Promise<void>((resolve) => {
        let stopping = false;
        const stop = (signal: string) => {
          if (stopping) return;
          stopping = true;
          process.stdout.write(`qalora serve: ${signal}: draining (up to ${deadline} s)\n`);
          server.shutdown(deadline * 1000).then((r) => {
            process.stdout.write(`qalora serve: stopped (${r.finished ? 'all requests finished' : `${r.cancelled} cancelled at the deadline`})\n`);
            resolve();
          }, (e) => {
            process.stderr.write(`qalora serve: shutdown failed: ${(e as Error).message}\n`);
            process.exitCode = 1;
            resolve();
          });
        };
        process.once('SIGTERM', () => stop('SIGTERM'));
        process.once('SIGINT', () => stop('SIGINT'));
      });
    });
}
