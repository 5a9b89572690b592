// A progress bar for long jobs (training, quantization, evaluation, export): rate, ETA and caller-chosen fields
// (loss, lr, tok/s, …). On a TTY it redraws one line through cli-progress; when stderr is not a TTY (CI, logs,
// pipes) it prints a plain line every `plainEverySeconds` and at the end, so logs stay readable.
import cliProgress from 'cli-progress';

export type ProgressFields = Record<string, string | number>;

export interface ProgressOptions {
  /** What is being counted, e.g. 'train', 'quantize'. */
  label: string;
  total: number;
  /** Unit shown after the counts, e.g. 'steps', 'layers'. */
  unit?: string;
  /** Where to write; defaults to process.stderr. */
  stream?: NodeJS.WriteStream | NodeJS.WritableStream;
  /** Force the TTY bar on or off (default: the stream's isTTY). */
  tty?: boolean;
  /** Non-TTY: seconds between plain lines (default 10). */
  plainEverySeconds?: number;
  /** Silence everything (e.g. --quiet or inside tests). */
  silent?: boolean;
  /** Start the count here (a resumed run). */
  start?: number;
}

/** Formats seconds as 1h02m, 3m04s or 5.2s. */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '?';
  if (seconds < 60) return `${seconds.toFixed(1)}s`;
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h > 0 ? `${h}h${String(m).padStart(2, '0')}m` : `${m}m${String(r).padStart(2, '0')}s`;
}

/** Formats a field value compactly: 4 significant digits for floats, integers as they are. */
/** 1.23 GiB, 456 MiB, 12 KiB: binary units, three significant digits. */
export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i === 0 ? n : n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)} ${units[i]}`;
}

export function formatField(v: string | number): string {
  if (typeof v === 'string') return v;
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return v.toPrecision(4);
}

export class Progress {
  private readonly opts: Required<Omit<ProgressOptions, 'stream' | 'tty' | 'start'>>;
  private readonly stream: NodeJS.WritableStream;
  private readonly bar: cliProgress.SingleBar | null;
  private readonly startedAt = Date.now();
  private readonly startValue: number;
  private value: number;
  private fields: ProgressFields = {};
  private lastPlain = Date.now();
  private finished = false;

  constructor(options: ProgressOptions) {
    this.opts = {
      label: options.label,
      total: Math.max(0, options.total),
      unit: options.unit ?? '',
      plainEverySeconds: options.plainEverySeconds ?? 10,
      silent: options.silent ?? false,
    };
    this.stream = options.stream ?? process.stderr;
    this.startValue = this.value = options.start ?? 0;
    const tty = options.tty ?? Boolean((this.stream as NodeJS.WriteStream).isTTY);
    this.bar = null;
    if (!this.opts.silent && tty) {
      this.bar = new cliProgress.SingleBar(
        {
          stream: this.stream as NodeJS.WriteStream,
          format: (_o, params) => this.line(params.value, true),
          hideCursor: true,
          clearOnComplete: false,
          forceRedraw: false,
          fps: 8,
          noTTYOutput: false,
        },
        cliProgress.Presets.shades_classic,
      );
      this.bar.start(this.opts.total, this.value);
    }
  }

  /** Items per second since start (excluding what a resumed run had already done). */
  rate(): number {
    const secs = (Date.now() - this.startedAt) / 1000;
    return secs > 0 ? (this.value - this.startValue) / secs : 0;
  }

  eta(): number {
    const r = this.rate();
    return r > 0 ? (this.opts.total - this.value) / r : Infinity;
  }

  update(value: number, fields: ProgressFields = {}): void {
    this.value = value;
    this.fields = { ...this.fields, ...fields };
    if (this.opts.silent || this.finished) return;
    if (this.bar) {
      this.bar.update(value);
      return;
    }
    const now = Date.now();
    if (now - this.lastPlain >= this.opts.plainEverySeconds * 1000) {
      this.lastPlain = now;
      this.stream.write(this.line(value, false) + '\n');
    }
  }

  increment(by = 1, fields: ProgressFields = {}): void {
    this.update(this.value + by, fields);
  }

  /** Prints a message without breaking the bar (e.g. a validation result). */
  log(message: string): void {
    if (this.opts.silent) return;
    if (this.bar) {
      // Clear the bar's line, print, and let the bar redraw under the message.
      this.stream.write('\r\x1b[2K' + message + '\n');
      this.bar.updateETA?.();
      this.bar.render?.();
    } else {
      this.stream.write(message + '\n');
    }
  }

  stop(): void {
    if (this.finished) return;
    this.finished = true;
    if (this.opts.silent) return;
    if (this.bar) {
      this.bar.update(this.value);
      this.bar.stop();
    } else {
      this.stream.write(this.line(this.value, false) + '\n');
    }
  }

  /** The status line, shared by the TTY bar and the plain lines so both show the same facts. */
  line(value: number, withBar: boolean): string {
    const { total, unit, label } = this.opts;
    const frac = total > 0 ? Math.min(1, value / total) : 1;
    const width = 24;
    const filled = Math.round(frac * width);
    const bar = withBar ? ` ${'█'.repeat(filled)}${'░'.repeat(width - filled)}` : '';
    const pct = `${(frac * 100).toFixed(0).padStart(3)}%`;
    const rate = this.rate();
    const fields = Object.entries(this.fields).map(([k, v]) => `${k} ${formatField(v)}`).join(' | ');
    const elapsed = (Date.now() - this.startedAt) / 1000;
    const done = value >= total;
    const time = done ? `${formatDuration(elapsed)}` : `ETA ${formatDuration(this.eta())}`;
    return `${label}${bar} ${pct} ${value}/${total}${unit ? ' ' + unit : ''} | ${formatField(rate)} ${unit || 'it'}/s | ${time}${fields ? ' | ' + fields : ''}`;
  }
}

/** A small ASCII sparkline, e.g. for a loss curve at the end of a run: ▇▆▅▄▃▂▂▁ */
export function sparkline(values: number[], width = 40): string {
  const v = values.filter((x) => Number.isFinite(x));
  if (v.length === 0) return '';
  // Average into `width` buckets so long runs still fit one line.
  const buckets: number[] = [];
  const n = Math.min(width, v.length);
  for (let b = 0; b < n; b++) {
    const lo = Math.floor((b * v.length) / n), hi = Math.max(lo + 1, Math.floor(((b + 1) * v.length) / n));
    let s = 0;
    for (let i = lo; i < hi; i++) s += v[i];
    buckets.push(s / (hi - lo));
  }
  const min = Math.min(...buckets), max = Math.max(...buckets);
  const ticks = '▁▂▃▄▅▆▇█';
  return buckets.map((x) => ticks[max > min ? Math.round(((x - min) / (max - min)) * (ticks.length - 1)) : 0]).join('');
}
