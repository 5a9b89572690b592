// Load test of `qalora serve` on loopback: starts the server as its own process (or uses --url, which must be a
// loopback address), then at each concurrency C sends streamed completions from C workers until --requests are
// done or --max-seconds pass, and reports throughput (requests/s, generated tokens/s), p50/p99 latency and time
// to first token, and the server's mean decode batch (from /metrics). The client is plain fetch + a minimal SSE
// reader, so the numbers measure the server, not a client library.
//
//   npx tsx bench/load-test.ts [--model PATH] [--spec FILE] [--lora name=DIR] [--concurrency 1,4,8,16]
//                              [--requests 32] [--max-tokens 64] [--max-seconds 60] [--url http://127.0.0.1:PORT]
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { sample } from '../runtime/serve/metrics.ts';
import { fixture, repoRoot } from '../test/fixtures.ts';

const { values: o } = parseArgs({
  options: {
    model: { type: 'string', default: fixture('models/stories260K/stories260K.bin') },
    spec: { type: 'string' },
    lora: { type: 'string', multiple: true, default: [] },
    'request-model': { type: 'string' },
    concurrency: { type: 'string', default: '1,2,4,8,16' },
    requests: { type: 'string', default: '32' },
    'max-tokens': { type: 'string', default: '64' },
    'max-seconds': { type: 'string', default: '60' },
    url: { type: 'string' },
    'api-key': { type: 'string' },
    json: { type: 'boolean', default: false },
  },
});

const PROMPTS = ['Once upon a time', 'The little dog', 'Lily and Ben', 'One day, a bird', 'The sun was', 'Tom had a red', 'In the big park', 'Mom said'];

function positiveInt(name: string, v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new Error(`--${name} ${v}: expected a positive integer`);
  return n;
}

const levels = o.concurrency!.split(',').map((c) => positiveInt('concurrency', c.trim()));
const requests = positiveInt('requests', o.requests!);
const maxTokens = positiveInt('max-tokens', o['max-tokens']!);
const maxSeconds = positiveInt('max-seconds', o['max-seconds']!);

function quantile(sorted: number[], q: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
}

async function startServer(): Promise<{ url: string; proc?: ChildProcess }> {
  if (o.url) {
    const host = new URL(o.url).hostname;
    if (!['127.0.0.1', 'localhost', '[::1]', '::1'].includes(host)) throw new Error(`--url ${o.url}: the load test only runs against loopback`);
    return { url: o.url.replace(/\/$/, '') };
  }
  const args = [join(repoRoot, 'bin/qalora.mjs'), 'serve', '--model', o.model!, '--port', '0', '--host', '127.0.0.1',
    '--parallel', String(Math.max(...levels)), '--max-queue', String(Math.max(...levels) * 2)];
  if (o.spec) args.push('--spec', o.spec);
  for (const l of o.lora!) args.push('--lora', l);
  if (o['api-key']) args.push('--api-key', o['api-key']);
  const proc = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'] });
  const url = await new Promise<string>((resolve, reject) => {
    let out = '';
    proc.stdout!.on('data', (d) => {
      out += d;
      const m = /listening on (http:\/\/[^/\s]+)\/v1/.exec(out);
      if (m) resolve(m[1]);
    });
    proc.on('exit', (code) => reject(new Error(`qalora serve exited (${code}) before listening`)));
  });
  return { url, proc };
}

interface One {
  ms: number;
  ttftMs: number;
  tokens: number;
  ok: boolean;
}

async function streamOne(url: string, prompt: string): Promise<One> {
  const t0 = performance.now();
  const headers: Record<string, string> = { 'content-type': 'application/json' };
  if (o['api-key']) headers.authorization = `Bearer ${o['api-key']}`;
  const r = await fetch(`${url}/v1/completions`, {
    method: 'POST', headers,
    body: JSON.stringify({ model: o['request-model'], prompt, max_tokens: maxTokens, temperature: 0.8, stream: true, stream_options: { include_usage: true } }),
  });
  if (!r.ok || !r.body) {
    await r.text();
    return { ms: performance.now() - t0, ttftMs: NaN, tokens: 0, ok: false };
  }
  let ttft = NaN, tokens = 0, buf = '';
  const decoder = new TextDecoder();
  for await (const chunk of r.body as unknown as AsyncIterable<Uint8Array>) {
    buf += decoder.decode(chunk, { stream: true });
    let end: number;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const event = buf.slice(0, end);
      buf = buf.slice(end + 2);
      if (!event.startsWith('data: ') || event === 'data: [DONE]') continue;
      const data = JSON.parse(event.slice(6));
      if (Number.isNaN(ttft) && data.choices?.[0]?.text) ttft = performance.now() - t0;
      if (data.usage) tokens = data.usage.completion_tokens;
    }
  }
  return { ms: performance.now() - t0, ttftMs: ttft, tokens, ok: true };
}

async function level(url: string, c: number): Promise<Record<string, number>> {
  const m0 = await (await fetch(`${url}/metrics`, { headers: o['api-key'] ? { authorization: `Bearer ${o['api-key']}` } : {} })).text();
  const deadline = performance.now() + maxSeconds * 1000;
  const results: One[] = [];
  let issued = 0;
  const t0 = performance.now();
  await Promise.all(Array.from({ length: c }, async () => {
    while (issued < requests && performance.now() < deadline) {
      const i = issued++;
      results.push(await streamOne(url, PROMPTS[i % PROMPTS.length]));
    }
  }));
  const wall = (performance.now() - t0) / 1000;
  const m1 = await (await fetch(`${url}/metrics`, { headers: o['api-key'] ? { authorization: `Bearer ${o['api-key']}` } : {} })).text();
  const delta = (s: string) => (sample(m1, s) ?? 0) - (sample(m0, s) ?? 0);
  const ok = results.filter((r) => r.ok);
  const lat = ok.map((r) => r.ms).sort((a, b) => a - b);
  const ttft = ok.map((r) => r.ttftMs).filter((x) => !Number.isNaN(x)).sort((a, b) => a - b);
  const tokens = ok.reduce((s, r) => s + r.tokens, 0);
  return {
    concurrency: c, requests: results.length, failed: results.length - ok.length, seconds: wall,
    reqPerSec: ok.length / wall, tokPerSec: tokens / wall,
    p50Ms: quantile(lat, 0.5), p99Ms: quantile(lat, 0.99), ttftP50Ms: quantile(ttft, 0.5), ttftP99Ms: quantile(ttft, 0.99),
    meanBatch: delta('qalora_decode_step_rows_total') / Math.max(1, delta('qalora_decode_steps_total')),
  };
}

const { url, proc } = await startServer();
try {
  const rows: Array<Record<string, number>> = [];
  if (!o.json) {
    process.stdout.write(`qalora serve load test: ${url}, ${requests} streamed completions × ${maxTokens} tokens per level (≤ ${maxSeconds} s each)\n`);
    process.stdout.write('conc  reqs  fail   req/s    tok/s   p50 ms   p99 ms  ttft p50  ttft p99  batch\n');
  }
  for (const c of levels) {
    const r = await level(url, c);
    rows.push(r);
    if (!o.json) {
      const f = (v: number, w: number, d = 0) => (Number.isFinite(v) ? v.toFixed(d) : '-').padStart(w);
      process.stdout.write(`${f(r.concurrency, 4)}  ${f(r.requests, 4)}  ${f(r.failed, 4)}  ${f(r.reqPerSec, 6, 2)}  ${f(r.tokPerSec, 7, 1)}  ` +
        `${f(r.p50Ms, 7)}  ${f(r.p99Ms, 7)}  ${f(r.ttftP50Ms, 8)}  ${f(r.ttftP99Ms, 8)}  ${f(r.meanBatch, 5, 2)}\n`);
    }
  }
  if (o.json) process.stdout.write(JSON.stringify(rows, null, 2) + '\n');
} finally {
  if (proc) {
    proc.kill('SIGTERM');
    await new Promise((r) => proc.on('exit', r));
  }
}
