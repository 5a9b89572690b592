// Reading training data into examples: a list of text parts, each marked as trained on (its tokens are loss
// targets) or context only (the Alpaca prompt, a chat's user turns). Formats are recognised from the content,
// so `--data` takes any of: plain text (documents split on a separator), JSONL with a text field, Alpaca JSON or
// JSONL (instruction/input/output), and HF chat records (`messages` with role/content).
import { readFileSync } from 'node:fs';
import { Template } from '@huggingface/jinja';
import { QaloraError } from '../errors.ts';

export interface ExamplePart {
  text: string;
  /** True: these tokens are loss targets; false: context only. */
  train: boolean;
}
export interface Example {
  parts: ExamplePart[];
}

export type DataFormat = 'text' | 'jsonl-text' | 'alpaca' | 'chat';

export interface ReadOptions {
  /** Force a format instead of detecting it. */
  format?: DataFormat;
  /** Plain text: documents are separated by this string (default `<|endoftext|>`). */
  separator?: string;
  /** JSONL text: the field holding the text (default 'text'). */
  textField?: string;
  /** Chat: a Jinja chat template (HF tokenizer_config.json `chat_template`); a plain default otherwise. */
  chatTemplate?: string;
  /** Special tokens the chat template may reference. */
  bosToken?: string;
  eosToken?: string;
  /** Replace `{{key}}` placeholders in Alpaca records (the identity set uses {{name}} and {{author}}). */
  placeholders?: Record<string, string>;
  /** Alpaca: train on the prompt too (default false: loss masked to the response). */
  trainOnPrompt?: boolean;
}

export const DEFAULT_SEPARATOR = '<|endoftext|>';

// The Stanford Alpaca prompt template (the one the QA-LoRA reference code fine-tunes with).
const ALPACA_WITH_INPUT =
  'Below is an instruction that describes a task, paired with an input that provides further context. ' +
  'Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n';
const ALPACA_NO_INPUT =
  'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' +
  '### Instruction:\n{instruction}\n\n### Response:\n';

/** The Alpaca prompt for an instruction and optional input (what the model sees before its response). */
export function alpacaPrompt(instruction: string, input = ''): string {
  const t = input.trim() ? ALPACA_WITH_INPUT.replace('{input}', () => input) : ALPACA_NO_INPUT;
  return t.replace('{instruction}', () => instruction);
}

/** Used when a chat model brings no template: role headers a small model can learn. */
export const DEFAULT_CHAT_TEMPLATE =
  "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n' }}{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

export function readExamples(path: string, opts: ReadOptions = {}): Example[] {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new QaloraError(`${path}: cannot read data file (${(e as Error).message})`);
  }
  return parseExamples(text, path, opts);
}

export function parseExamples(text: string, path: string, opts: ReadOptions = {}): Example[] {
  const records = opts.format === 'text' ? null : parseJsonRecords(text, path);
  if (records === null) return splitText(text, opts.separator ?? DEFAULT_SEPARATOR);
  if (records.length === 0) throw new QaloraError(`${path}: no records`);
  const format = opts.format ?? detectFormat(records[0].value, `${path}:${records[0].line}`);
  return records.map(({ value, line }) => {
    const where = `${path}:${line}`;
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      throw new QaloraError(`${where}: expected a JSON object, got ${JSON.stringify(value)?.slice(0, 60)}`);
    }
    const rec = value as Record<string, unknown>;
    if (format === 'alpaca') return alpacaExample(rec, where, opts);
    if (format === 'chat') return chatExample(rec, where, opts);
    const field = opts.textField ?? 'text';
    if (typeof rec[field] !== 'string') throw new QaloraError(`${where}: record has no string field '${field}' (keys: ${Object.keys(rec).join(', ')})`);
    return { parts: [{ text: rec[field] as string, train: true }] };
  });
}

function splitText(text: string, separator: string): Example[] {
  return text
    .split(separator)
    .map((d) => d.trim())
    .filter((d) => d.length > 0)
    .map((d) => ({ parts: [{ text: d, train: true }] }));
}

interface JsonRecord { value: unknown; line: number }

/** A JSON array or JSONL, with the line each record starts on; null when the file is not JSON at all. */
function parseJsonRecords(text: string, path: string): JsonRecord[] | null {
  const trimmed = text.trimStart();
  if (trimmed.startsWith('[')) {
    let arr: unknown;
    try {
      arr = JSON.parse(text);
    } catch (e) {
      throw new QaloraError(`${path}: looks like a JSON array but does not parse (${(e as Error).message})`);
    }
    return (arr as unknown[]).map((value, i) => ({ value, line: i + 1 }));
  }
  if (!trimmed.startsWith('{')) return null;
  const out: JsonRecord[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const l = lines[i].trim();
    if (!l) continue;
    try {
      out.push({ value: JSON.parse(l), line: i + 1 });
    } catch (e) {
      throw new QaloraError(`${path}:${i + 1}: invalid JSON line (${(e as Error).message})`);
    }
  }
  return out;
}

function detectFormat(first: unknown, where: string): DataFormat {
  const rec = (first ?? {}) as Record<string, unknown>;
  if (Array.isArray(rec.messages)) return 'chat';
  if ('instruction' in rec && 'output' in rec) return 'alpaca';
  if (typeof rec.text === 'string') return 'jsonl-text';
  throw new QaloraError(
    `${where}: cannot tell the data format from the first record (keys: ${Object.keys(rec).join(', ') || 'none'}); ` +
      `expected 'text', 'instruction'+'output' (Alpaca) or 'messages' (chat)`,
  );
}

function fill(s: string, placeholders: Record<string, string> | undefined): string {
  if (!placeholders) return s;
  return s.replace(/\{\{\s*(\w+)\s*\}\}/g, (m, k: string) => placeholders[k] ?? m);
}

function alpacaExample(rec: Record<string, unknown>, where: string, opts: ReadOptions): Example {
  for (const k of ['instruction', 'output'] as const) {
    if (typeof rec[k] !== 'string') throw new QaloraError(`${where}: Alpaca record needs a string '${k}'`);
  }
  if (rec.input !== undefined && typeof rec.input !== 'string') throw new QaloraError(`${where}: Alpaca 'input' must be a string`);
  const ph = opts.placeholders;
  const prompt = alpacaPrompt(fill(rec.instruction as string, ph), fill((rec.input as string | undefined) ?? '', ph));
  return { parts: [{ text: prompt, train: !!opts.trainOnPrompt }, { text: fill(rec.output as string, ph), train: true }] };
}

const templateCache = new Map<string, Template>();

function chatExample(rec: Record<string, unknown>, where: string, opts: ReadOptions): Example {
  const messages = rec.messages as unknown[];
  messages.forEach((m, i) => {
    const mm = m as Record<string, unknown>;
    if (typeof mm?.role !== 'string' || typeof mm?.content !== 'string') {
      throw new QaloraError(`${where}: messages[${i}] needs string 'role' and 'content'`);
    }
  });
  const src = opts.chatTemplate ?? DEFAULT_CHAT_TEMPLATE;
  let tpl = templateCache.get(src);
  if (!tpl) {
    try {
      tpl = new Template(src);
    } catch (e) {
      throw new QaloraError(`chat template does not parse: ${(e as Error).message}`);
    }
    templateCache.set(src, tpl);
  }
  const render = (msgs: unknown[], addGenerationPrompt: boolean) =>
    tpl!.render({ messages: msgs, add_generation_prompt: addGenerationPrompt, bos_token: opts.bosToken ?? '', eos_token: opts.eosToken ?? '' });
  // Cut the rendered conversation where each assistant turn starts and ends: the template decides the text,
  // only the assistant's own tokens become targets.
  const parts: ExamplePart[] = [];
  let done = '';
  const push = (upTo: string, train: boolean) => {
    if (!upTo.startsWith(done)) {
      throw new QaloraError(`${where}: the chat template does not render conversations as growing prefixes; cannot mask turns`);
    }
    if (upTo.length > done.length) parts.push({ text: upTo.slice(done.length), train });
    done = upTo;
  };
  for (let i = 0; i < messages.length; i++) {
    if ((messages[i] as { role: string }).role !== 'assistant') continue;
    push(render(messages.slice(0, i), true), false);
    push(render(messages.slice(0, i + 1), false), true);
  }
  push(render(messages, false), false);
  if (!parts.some((p) => p.train)) throw new QaloraError(`${where}: conversation has no assistant message to train on`);
  return { parts };
}
