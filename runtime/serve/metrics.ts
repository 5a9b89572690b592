// Prometheus text exposition (format 0.0.4) of the server's counters and the engine's live state. Routes are
// labelled by their known path (unknown paths all count as "other") so a scanner cannot blow up the series.
import type { EngineStats } from './engine.ts';

const LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];

class Histogram {
  readonly counts = new Array<number>(LATENCY_BUCKETS.length).fill(0);
  sum = 0;
  count = 0;
  observe(v: number): void {
    this.sum += v;
    this.count++;
    for (let i = 0; i < LATENCY_BUCKETS.length; i++) if (v <= LATENCY_BUCKETS[i]) this.counts[i]++;
  }
}

function label(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
}

export class Metrics {
  private readonly requests = new Map<string, number>();
  private readonly latency = new Map<string, Histogram>();
  promptTokens = 0;
  completionTokens = 0;
  private readonly started = Date.now();

  request(route: string, method: string, status: number, seconds: number): void {
    const key = `${route}\u0000${method}\u0000${status}`;
    this.requests.set(key, (this.requests.get(key) ?? 0) + 1);
    let h = this.latency.get(route);
    if (!h) this.latency.set(route, (h = new Histogram()));
    h.observe(seconds);
  }

  tokens(prompt: number, completion: number): void {
    this.promptTokens += prompt;
    this.completionTokens += completion;
  }

  /** How many requests got `status` on `route` so far (tests, the load script). */
  count(route: string, status: number): number {
    let n = 0;
    for (const [k, v] of this.requests) {
      const [r, , s] = k.split('\u0000');
      if (r === route && Number(s) === status) n += v;
    }
    return n;
  }

  render(e: EngineStats): string {
    const out: string[] = [];
    const metric = (name: string, type: string, help: string, lines: string[]) => {
      out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`, ...lines);
    };
    metric('qalora_requests_total', 'counter', 'HTTP requests by route, method and status.',
      [...this.requests].map(([k, v]) => {
        const [route, method, status] = k.split('\u0000');
        return `qalora_requests_total{route="${label(route)}",method="${method}",status="${status}"} ${v}`;
      }));
    const hist: string[] = [];
    for (const [route, h] of this.latency) {
      const r = label(route);
      LATENCY_BUCKETS.forEach((b, i) => hist.push(`qalora_request_duration_seconds_bucket{route="${r}",le="${b}"} ${h.counts[i]}`));
      hist.push(`qalora_request_duration_seconds_bucket{route="${r}",le="+Inf"} ${h.count}`);
      hist.push(`qalora_request_duration_seconds_sum{route="${r}"} ${h.sum}`);
      hist.push(`qalora_request_duration_seconds_count{route="${r}"} ${h.count}`);
    }
    metric('qalora_request_duration_seconds', 'histogram', 'Time from request to the end of its response.', hist);
    metric('qalora_prompt_tokens_total', 'counter', 'Prompt tokens of completed generation requests.', [`qalora_prompt_tokens_total ${this.promptTokens}`]);
    metric('qalora_completion_tokens_total', 'counter', 'Tokens generated for completed generation requests.', [`qalora_completion_tokens_total ${this.completionTokens}`]);
    metric('qalora_generated_tokens_total', 'counter', 'Tokens sampled by the engine, cancelled requests included.', [`qalora_generated_tokens_total ${e.generatedTokens}`]);
    metric('qalora_prefill_tokens_total', 'counter', 'Prompt tokens prefilled by the engine.', [`qalora_prefill_tokens_total ${e.prefillTokens}`]);
    metric('qalora_queue_depth', 'gauge', 'Requests waiting for a slot.', [`qalora_queue_depth ${e.queued}`]);
    metric('qalora_active_sequences', 'gauge', 'Sequences holding a KV-cache slot.', [`qalora_active_sequences ${e.active}`]);
    metric('qalora_slots', 'gauge', 'KV-cache slots (--parallel).', [`qalora_slots ${e.slots}`]);
    metric('qalora_tokens_per_second', 'gauge', 'Generated tokens per second over the last seconds.', [`qalora_tokens_per_second ${e.tokensPerSecond.toFixed(3)}`]);
    metric('qalora_decode_steps_total', 'counter', 'Batched decode steps run.', [`qalora_decode_steps_total ${e.steps}`]);
    metric('qalora_decode_batched_steps_total', 'counter', 'Decode steps that advanced more than one sequence.', [`qalora_decode_batched_steps_total ${e.batchedSteps}`]);
    metric('qalora_decode_step_rows_total', 'counter', 'Sequences advanced, summed over decode steps.', [`qalora_decode_step_rows_total ${e.stepRows}`]);
    metric('qalora_decode_max_batch', 'gauge', 'Largest decode batch so far.', [`qalora_decode_max_batch ${e.maxBatch}`]);
    metric('qalora_cancelled_requests_total', 'counter', 'Requests cancelled (client gone, or shutdown deadline).', [`qalora_cancelled_requests_total ${e.cancelled}`]);
    metric('qalora_rejected_requests_total', 'counter', 'Requests refused because the queue was full (429).', [`qalora_rejected_requests_total ${e.rejected}`]);
    metric('qalora_uptime_seconds', 'gauge', 'Seconds since the server started.', [`qalora_uptime_seconds ${((Date.now() - this.started) / 1000).toFixed(3)}`]);
    return out.join('\n') + '\n';
  }
}

/** Reads one sample from Prometheus text (tests and the load script): `name` or `name{labels}` exactly. */
export function sample(text: string, series: string): number | undefined {
  for (const line of text.split('\n')) {
    if (line.startsWith(series + ' ')) return Number(line.slice(series.length + 1));
  }
  return undefined;
}
