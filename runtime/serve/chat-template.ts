// Chat prompts: the model's own Jinja chat template (GGUF `tokenizer.chat_template`, HF tokenizer_config.json
// `chat_template` or chat_template.jinja) or one given with --chat-template, rendered with @huggingface/jinja as
// transformers does. llama2.c checkpoints carry none; their default joins the messages' text with newlines,
// so a single user message is exactly a completion prompt (these are story models, not chat models).
import { closeSync, existsSync, openSync, readFileSync, readSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { Template } from '@huggingface/jinja';
import { QaloraError } from '../errors.ts';
import type { Tokenizer } from '../tokenizer/types.ts';
import { ApiError } from './errors.ts';
import type { ChatMessage } from './params.ts';

export const PLAIN_TEMPLATE = "{% for message in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}{{ message['content'] }}{% endfor %}";

export interface ChatTemplate {
  /** Where the template came from, for the startup banner. */
  source: string;
  bosToken: string;
  eosToken: string;
  render(messages: ChatMessage[]): string;
}

interface Found {
  text: string;
  source: string;
  bos?: string;
  eos?: string;
}

function specialName(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as { content?: unknown }).content === 'string') return (v as { content: string }).content;
  return undefined;
}

function fromHfDir(dir: string): Found | undefined {
  const cfgPath = join(dir, 'tokenizer_config.json');
  let cfg: Record<string, unknown> = {};
  if (existsSync(cfgPath)) {
    try {
      cfg = JSON.parse(readFileSync(cfgPath, 'utf8'));
    } catch (e) {
      throw new QaloraError(`${cfgPath}: not valid JSON (${(e as Error).message})`);
    }
  }
  const names = { bos: specialName(cfg.bos_token), eos: specialName(cfg.eos_token) };
  const jinja = join(dir, 'chat_template.jinja');
  if (existsSync(jinja)) return { text: readFileSync(jinja, 'utf8'), source: jinja, ...names };
  let t = cfg.chat_template;
  // Newer configs hold several named templates; 'default' is the chat one.
  if (Array.isArray(t)) t = (t as Array<{ name?: string; template?: string }>).find((x) => x.name === 'default')?.template;
  if (typeof t === 'string') return { text: t, source: `${cfgPath} (chat_template)`, ...names };
  return undefined;
}

async function fromGguf(path: string): Promise<Found | undefined> {
  const { GGUF_MAGIC, readGguf } = await import('../formats/gguf.ts');
  const head = Buffer.alloc(4);
  const fd = openSync(path, 'r');
  try {
    if (readSync(fd, head, 0, 4, 0) !== 4) return undefined;
  } finally {
    closeSync(fd);
  }
  if (head.readUInt32LE(0) !== GGUF_MAGIC) return undefined;
  const f = readGguf(path);
  const t = f.metadata.get('tokenizer.chat_template')?.value;
  if (typeof t !== 'string') return undefined;
  const tokens = f.metadata.get('tokenizer.ggml.tokens')?.value as unknown as string[] | undefined;
  const id = (key: string) => Number(f.metadata.get(key)?.value ?? -1);
  return { text: t, source: `${path} (tokenizer.chat_template)`, bos: tokens?.[id('tokenizer.ggml.bos_token_id')], eos: tokens?.[id('tokenizer.ggml.eos_token_id')] };
}

/** Finds the template: the flag's file, else the first of `paths` (model, tokenizer) that carries one. */
export async function findChatTemplate(paths: Array<string | undefined>, flagFile?: string): Promise<ChatTemplate> {
  let found: Found | undefined;
  if (flagFile) {
    if (!existsSync(flagFile)) throw new QaloraError(`--chat-template ${flagFile}: no such file`);
    found = { text: readFileSync(flagFile, 'utf8'), source: flagFile };
  }
  for (const p of paths) {
    if (found || !p || !existsSync(p)) continue;
    if (statSync(p).isDirectory()) found = fromHfDir(p);
    else found = (await fromGguf(p)) ?? fromHfDir(dirname(p));
  }
  return makeTemplate(found ?? { text: PLAIN_TEMPLATE, source: 'built-in plain template (messages joined by newlines)' });
}

export function makeTemplate(f: Found): ChatTemplate {
  let template: Template;
  try {
    template = new Template(f.text);
  } catch (e) {
    throw new QaloraError(`chat template from ${f.source}: cannot parse (${(e as Error).message})`);
  }
  const bosToken = f.bos ?? '<s>', eosToken = f.eos ?? '</s>';
  return {
    source: f.source, bosToken, eosToken,
    render(messages) {
      try {
        return template.render({ messages, add_generation_prompt: true, bos_token: bosToken, eos_token: eosToken });
      } catch (e) {
        // Templates reject conversations they cannot format (raise_exception), e.g. roles out of order.
        throw new ApiError(400, `the chat template refused these messages: ${(e as Error).message}`, 'invalid_request_error', 'invalid_messages', 'messages');
      }
    },
  };
}

/**
 * Token ids of a rendered chat prompt: the template's BOS/EOS strings become those tokens (text is never
 * tokenized into them), and the prompt starts with BOS exactly once.
 */
export function encodeChat(text: string, tmpl: ChatTemplate, tok: Tokenizer): number[] {
  const ids: number[] = [];
  const specials: Array<[string, number]> = [[tmpl.bosToken, tok.bos], [tmpl.eosToken, tok.eos]];
  let rest = text;
  while (rest.length) {
    let at = -1, which: [string, number] | undefined;
    for (const s of specials) {
      const i = s[0] ? rest.indexOf(s[0]) : -1;
      if (i >= 0 && (at < 0 || i < at)) { at = i; which = s; }
    }
    const plain = at < 0 ? rest : rest.slice(0, at);
    if (plain) ids.push(...tok.encode(plain));
    if (at < 0) break;
    ids.push(which![1]);
    rest = rest.slice(at + which![0].length);
  }
  if (ids[0] !== tok.bos) ids.unshift(tok.bos);
  return ids;
}
