// Chat templates for `qalora serve`: found in tokenizer_config.json / chat_template.jinja / --chat-template,
// rendered as transformers renders them (a LLaMA-2 style template written out by hand here), and encoded so
// the template's BOS/EOS strings become those tokens rather than text; the plain default for llama2.c models.
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { encodeChat, findChatTemplate, makeTemplate, PLAIN_TEMPLATE } from '../runtime/serve/chat-template.ts';
import { readLlama2cTokenizer } from '../runtime/tokenizer/llama2c.ts';
import { ApiError } from '../runtime/serve/errors.ts';
import { GgufValueType, serializeGguf } from '../runtime/formats/gguf.ts';
import { fixture } from './fixtures.ts';

// The shape of Meta's LLaMA-2 chat template (system folded into the first user turn, turns closed by EOS).
const LLAMA2 =
  "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{% set msgs = messages[1:] %}" +
  "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}" +
  "{% for m in msgs %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate user/assistant') }}{% endif %}" +
  "{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + (sys if loop.first else '') + m['content'] + ' [/INST]' }}" +
  "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}";

const TOK = 'models/stories260K/tok512.bin';

describe('chat templates', () => {
  it('renders a LLaMA-2 style template and maps its BOS/EOS strings to tokens', () => {
    const tok = readLlama2cTokenizer(fixture(TOK));
    const t = makeTemplate({ text: LLAMA2, source: 'test' });
    const messages = [
      { role: 'system', content: 'Be kind.' },
      { role: 'user', content: 'Hi' },
      { role: 'assistant', content: 'Hello' },
      { role: 'user', content: 'Tell a story' },
    ];
    const text = t.render(messages);
    expect(text).toBe('<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Tell a story [/INST]');
    const ids = encodeChat(text, t, tok);
    // Expected: BOS, text, EOS, BOS, text: each piece encoded alone, never the literal "<s>".
    const expected = [tok.bos, ...tok.encode('[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHi [/INST] Hello '), tok.eos, tok.bos, ...tok.encode('[INST] Tell a story [/INST]')];
    expect(ids).toEqual(expected);
    expect(ids.filter((i) => i === tok.bos).length).toBe(2);
    // A template's raise_exception becomes a 400 naming messages.
    let err: unknown;
    try {
      t.render([{ role: 'assistant', content: 'x' }]);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ApiError);
    expect((err as ApiError).status).toBe(400);
    expect((err as ApiError).param).toBe('messages');
    expect((err as ApiError).message).toMatch(/roles must alternate/);
  });

  it('the plain default joins messages with newlines and adds BOS once', () => {
    const tok = readLlama2cTokenizer(fixture(TOK));
    const t = makeTemplate({ text: PLAIN_TEMPLATE, source: 'plain' });
    const text = t.render([{ role: 'system', content: 'Once upon a time' }, { role: 'user', content: 'a cat' }]);
    expect(text).toBe('Once upon a time\na cat');
    expect(encodeChat(text, t, tok)).toEqual(tok.encode('Once upon a time\na cat', { bos: true }));
  });

  it('is found in tokenizer_config.json, chat_template.jinja, or the flag\'s file, in that order of preference', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qalora-chat-'));
    writeFileSync(join(dir, 'tokenizer_config.json'), JSON.stringify({
      bos_token: { content: '<|begin|>' }, eos_token: '<|end|>',
      chat_template: [{ name: 'tool_use', template: 'TOOLS' }, { name: 'default', template: '{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}' }],
    }));
    const fromConfig = await findChatTemplate([dir]);
    expect(fromConfig.source).toMatch(/tokenizer_config\.json/);
    expect(fromConfig.render([{ role: 'user', content: 'hi' }])).toBe('<|begin|><user>hi<|end|>');
    // A file inside the directory is looked up beside it too.
    writeFileSync(join(dir, 'model.bin'), 'not a gguf');
    expect((await findChatTemplate([join(dir, 'model.bin')])).source).toMatch(/tokenizer_config\.json/);

    writeFileSync(join(dir, 'chat_template.jinja'), 'J:{{ messages[0].content }}');
    expect((await findChatTemplate([dir])).render([{ role: 'user', content: 'x' }])).toBe('J:x');

    const flag = join(dir, 'mine.jinja');
    writeFileSync(flag, 'F:{{ messages | length }}');
    expect((await findChatTemplate([dir], flag)).render([{ role: 'user', content: 'x' }])).toBe('F:1');

    await expect(findChatTemplate([dir], join(dir, 'nope.jinja'))).rejects.toThrow(/--chat-template .*nope\.jinja: no such file/);
    writeFileSync(flag, '{% for %}');
    await expect(findChatTemplate([dir], flag)).rejects.toThrow(/cannot parse/);
    expect((await findChatTemplate([join(tmpdir(), 'no-such-model.bin')])).source).toMatch(/built-in plain/);
  });

  it('is read from a GGUF file\'s tokenizer.chat_template, with its BOS/EOS pieces', async () => {
    const T = GgufValueType;
    const file = join(mkdtempSync(join(tmpdir(), 'qalora-chat-')), 'm.gguf');
    writeFileSync(file, Buffer.concat(serializeGguf([
      ['general.architecture', T.STRING, 'llama'],
      ['tokenizer.chat_template', T.STRING, '{{ bos_token }}{{ messages[0].content }}{{ eos_token }}'],
      ['tokenizer.ggml.tokens', T.ARRAY, ['<unk>', '<|bos|>', '<|eos|>'], T.STRING],
      ['tokenizer.ggml.bos_token_id', T.U32, 1],
      ['tokenizer.ggml.eos_token_id', T.U32, 2],
    ], [])));
    const t = await findChatTemplate([file]);
    expect(t.source).toMatch(/tokenizer\.chat_template/);
    expect(t.render([{ role: 'user', content: 'hi' }])).toBe('<|bos|>hi<|eos|>');
  });
});
