// Data pipeline: formats, masking, caching, packing, the held-out split and the deterministic order.
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadTokenStream, streamCacheKey } from '../runtime/data/cache.ts';
import { epochOrder, PackedWindows, splitWindows, WindowSchedule } from '../runtime/data/dataset.ts';
import { alpacaPrompt, parseExamples, readExamples } from '../runtime/data/examples.ts';
import { dataTokenizer, tokenizeExamples, type DataTokenizer } from '../runtime/data/tokenize.ts';
import { readLlama2cTokenizer } from '../runtime/tokenizer/llama2c.ts';
import { chatTemplateFor } from '../runtime/train/setup.ts';
import { fixture, needs } from './fixtures.ts';

// One token per character: boundaries and masks can be checked by counting characters.
const charTok: DataTokenizer = {
  encode: (t) => Array.from(t, (c) => c.codePointAt(0)! + 3),
  bos: 1,
  eos: 2,
  fingerprint: 'chars',
};
const decodeChars = (ids: ArrayLike<number>) => Array.from(ids, (i) => String.fromCodePoint(i - 3)).join('');

const dir = mkdtempSync(join(tmpdir(), 'qalora-data-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const file = (name: string, text: string) => {
  const p = join(dir, name);
  writeFileSync(p, text);
  return p;
};

describe('formats', () => {
  it('splits plain text on the separator, dropping empty documents', () => {
    const ex = parseExamples('one story<|endoftext|>\n two <|endoftext|><|endoftext|>three', 'x.txt');
    expect(ex.map((e) => e.parts.map((p) => p.text).join(''))).toEqual(['one story', 'two', 'three']);
    expect(ex.every((e) => e.parts.every((p) => p.train))).toBe(true);
  });

  it('reads JSONL text records and names the line of a bad one', () => {
    const ex = parseExamples('{"text":"a"}\n\n{"text":"bc"}\n', 'd.jsonl');
    expect(ex.map((e) => e.parts[0].text)).toEqual(['a', 'bc']);
    expect(() => parseExamples('{"text":"a"}\n{"text": oops}\n', 'd.jsonl')).toThrow(/d\.jsonl:2: invalid JSON/);
    expect(() => parseExamples('{"text":"a"}\n{"txt":"b"}\n', 'd.jsonl')).toThrow(/d\.jsonl:2: record has no string field 'text'/);
    expect(() => parseExamples('{"foo":1}\n', 'd.jsonl')).toThrow(/cannot tell the data format/);
  });

  it('renders Alpaca records with the Stanford template and masks the loss to the response', () => {
    const recs = [
      { instruction: 'Add the numbers.', input: '2 and 3', output: '5' },
      { instruction: 'Who are you?', input: '', output: 'I am {{name}}.' },
    ];
    const ex = parseExamples(JSON.stringify(recs), 'a.json', { placeholders: { name: 'Qal' } });
    expect(ex[0].parts[0].text).toBe(
      'Below is an instruction that describes a task, paired with an input that provides further context. Write a response that ' +
        'appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n',
    );
    expect(ex[1].parts[0].text).toBe(alpacaPrompt('Who are you?'));
    expect(ex[1].parts[0].text).not.toContain('### Input');
    expect(ex[1].parts[1].text).toBe('I am Qal.');
    const s = tokenizeExamples(ex, charTok);
    // Example 1: BOS, prompt (masked), response (trained), EOS (trained).
    const start = s.starts[1], promptLen = ex[1].parts[0].text.length;
    expect(s.tokens[start]).toBe(1);
    expect(Array.from(s.mask.subarray(start, start + 1 + promptLen)).every((m) => m === 0)).toBe(true);
    const resp = s.mask.subarray(start + 1 + promptLen, start + 1 + promptLen + 'I am Qal.'.length + 1);
    expect(Array.from(resp).every((m) => m === 1)).toBe(true);
    expect(decodeChars(s.tokens.subarray(start + 1 + promptLen, start + 1 + promptLen + 9))).toBe('I am Qal.');
    expect(s.tokens[start + 1 + promptLen + 9]).toBe(2);
    expect(() => parseExamples('[{"instruction": 3, "output": "x"}]', 'b.json')).toThrow(/b\.json:1: Alpaca record needs a string 'instruction'/);
  });

  it('renders chat messages with a Jinja template and trains only on assistant turns', () => {
    const conv = { messages: [
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'Hi' },
      { role: 'assistant', content: 'Hello!' },
      { role: 'user', content: 'Bye' },
      { role: 'assistant', content: 'Ciao.' },
    ] };
    const tpl = "{% for m in messages %}{{ '[' + m.role + '] ' + m.content + eos_token }}{% endfor %}{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}";
    const ex = parseExamples(JSON.stringify(conv) + '\n', 'c.jsonl', { chatTemplate: tpl, eosToken: '</s>' });
    const full = ex[0].parts.map((p) => p.text).join('');
    expect(full).toBe('[system] Be brief.</s>[user] Hi</s>[assistant] Hello!</s>[user] Bye</s>[assistant] Ciao.</s>');
    const trained = ex[0].parts.filter((p) => p.train).map((p) => p.text);
    expect(trained).toEqual(['Hello!</s>', 'Ciao.</s>']);
    // The default template also works and leaves the user's words untrained.
    const def = parseExamples(JSON.stringify(conv), 'c.jsonl', { format: 'chat' })[0];
    expect(def.parts.filter((p) => p.train).map((p) => p.text).join('|')).toBe('Hello!\n|Ciao.\n');
    expect(() => parseExamples('{"messages":[{"role":"user","content":"x"}]}', 'c.jsonl')).toThrow(/no assistant message/);
  });

  it('masks Alpaca prompts with a real SentencePiece tokenizer too', needs('models/stories260K/tok512.bin', 'data/instructions/identity.alpaca.json'), () => {
    const tok = readLlama2cTokenizer(fixture('models/stories260K/tok512.bin'));
    const dt = dataTokenizer(tok, 'tok512');
    const ex = readExamples(fixture('data/instructions/identity.alpaca.json'), { placeholders: { name: 'Qal', author: 'us' } });
    expect(ex.length).toBe(91);
    const s = tokenizeExamples(ex.slice(0, 5), dt);
    for (let e = 0; e < 5; e++) {
      const start = s.starts[e], end = e + 1 < 5 ? s.starts[e + 1] : s.tokens.length;
      const trainedIds = [];
      for (let i = start; i < end; i++) if (s.mask[i] && s.tokens[i] !== tok.eos) trainedIds.push(s.tokens[i]);
      // What is trained decodes to the response (up to the SentencePiece space at the boundary).
      expect(tok.decode(trainedIds).trim()).toBe((ex[e].parts[1].text).trim());
      expect(s.mask[end - 1]).toBe(1); // EOS is learnt
    }
  });
});

describe('chat templates from the model', () => {
  it("uses tokenizer_config.json's chat_template and special tokens, or an explicit file", () => {
    const model = join(dir, 'hf-model');
    mkdirSync(model, { recursive: true });
    writeFileSync(join(model, 'tokenizer_config.json'), JSON.stringify({
      chat_template: "{% for m in messages %}{{ '<' + m.role + '>' + m.content + eos_token }}{% endfor %}{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}",
      eos_token: { content: '</s>' }, bos_token: '<s>',
    }));
    const t = chatTemplateFor(model);
    expect(t.eos).toBe('</s>');
    const ex = parseExamples(JSON.stringify({ messages: [{ role: 'user', content: 'a' }, { role: 'assistant', content: 'b' }] }), 'c.jsonl', {
      chatTemplate: t.template, eosToken: t.eos,
    });
    expect(ex[0].parts).toEqual([{ text: '<user>a</s><assistant>', train: false }, { text: 'b</s>', train: true }]);
    const file = join(dir, 'tpl.jinja');
    writeFileSync(file, '{{ messages[0].content }}');
    expect(chatTemplateFor(model, file).template).toBe('{{ messages[0].content }}');
    expect(chatTemplateFor(join(dir, 'no-model.bin'))).toEqual({});
    expect(() => chatTemplateFor(model, join(dir, 'missing.jinja'))).toThrow(/no such chat template file/);
  });
});

describe('cache', () => {
  it('tokenizes once and keys the cache by file content, tokenizer and options', () => {
    const p = file('stories.txt', 'alpha beta<|endoftext|>gamma');
    const cacheDir = join(dir, 'cache');
    const a = loadTokenStream(p, charTok, {}, { dir: cacheDir });
    expect(a.cached).toBe(false);
    const b = loadTokenStream(p, charTok, {}, { dir: cacheDir });
    expect(b.cached).toBe(true);
    expect(Array.from(b.tokens)).toEqual(Array.from(a.tokens));
    expect(Array.from(b.mask)).toEqual(Array.from(a.mask));
    expect(decodeChars(a.tokens.subarray(1, 11))).toBe('alpha beta');
    const k1 = streamCacheKey(p, charTok, {});
    expect(streamCacheKey(p, { ...charTok, fingerprint: 'other' }, {})).not.toBe(k1);
    expect(streamCacheKey(p, charTok, { separator: '\n' })).not.toBe(k1);
    writeFileSync(p, 'alpha beta<|endoftext|>gamma!');
    expect(streamCacheKey(p, charTok, {})).not.toBe(k1);
    expect(loadTokenStream(p, charTok, {}, { dir: cacheDir }).cached).toBe(false);
  });
});

describe('packing and order', () => {
  const stream = tokenizeExamples(parseExamples('abcdefghij<|endoftext|>klmnopq<|endoftext|>rstu', 'x.txt'), charTok);

  it('packs windows whose targets are the next tokens, padding and masking the tail', () => {
    const T = 5;
    const w = new PackedWindows(stream, T);
    expect(w.count).toBe(Math.ceil((stream.tokens.length - 1) / T));
    const b = w.batch(Array.from({ length: w.count }, (_, i) => i));
    for (let i = 0; i < stream.tokens.length - 1; i++) {
      expect(b.tokens[i]).toBe(stream.tokens[i]);
      expect(b.targets[i]).toBe(stream.tokens[i + 1]);
      expect(b.mask[i]).toBe(stream.mask[i + 1]);
    }
    for (let i = stream.tokens.length - 1; i < b.tokens.length; i++) expect(b.mask[i]).toBe(0);
    // BOS is never a target.
    for (let i = 0; i < b.targets.length; i++) if (b.targets[i] === 1) expect(b.mask[i]).toBe(0);
    expect(b.count).toBe(w.targetCount());
  });

  it('holds out the last windows for validation, disjoint from training', () => {
    const s = splitWindows(stream, 4, 0.25);
    expect(s.val).not.toBeNull();
    expect(s.train.count + s.val!.count).toBe(Math.ceil((stream.tokens.length - 1) / 4));
    expect(s.val!.first).toBe(s.train.count);
    expect(s.train.targetCount() + s.val!.targetCount()).toBe(new PackedWindows(stream, 4).targetCount());
    expect(splitWindows(stream, 4, 0).val).toBeNull();
    expect(() => splitWindows(stream, 1000, 1.5)).toThrow(/validation fraction/);
  });

  it('visits windows in a seeded order that is a permutation per epoch and reproducible', () => {
    const a = Array.from(epochOrder(50, 7, 0));
    expect([...a].sort((x, y) => x - y)).toEqual(Array.from({ length: 50 }, (_, i) => i));
    expect(Array.from(epochOrder(50, 7, 0))).toEqual(a);
    expect(Array.from(epochOrder(50, 8, 0))).not.toEqual(a);
    expect(Array.from(epochOrder(50, 7, 1))).not.toEqual(a);
    const sched = new WindowSchedule(50, 7);
    const all = sched.take(0, 120);
    // Resuming at any position sees the same continuation.
    expect(new WindowSchedule(50, 7).take(37, 83)).toEqual(all.slice(37));
    expect(all.slice(50, 100)).toEqual(Array.from(epochOrder(50, 7, 1)));
  });
});
