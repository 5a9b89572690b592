// One llama.cpp (node-llama-cpp, prebuilt CPU build) generation in its own process, for the benchmarks:
//   node --import tsx bench/llamacpp-child.ts FILE THREADS NEW_TOKENS '[prompt ids]'
// Prints READY when the context exists and FIRST at the first new token (the parent timestamps both: load and
// first token are measured the same way for both tools); the in-process prefill/decode times come back as JSON
// on the last line. A child of its own, so its spinning threads never share the cores with a qalora measurement.
const [file, threads, decode, ids] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4]), JSON.parse(process.argv[5]) as number[]];
const { getLlama } = await import('node-llama-cpp');
const llama = await getLlama({ gpu: false, build: 'never', logLevel: 'error' as never });
const model = await llama.loadModel({ modelPath: file });
// A context just big enough for the run: llama.cpp's KV cache is then small, like a real short chat.
const ctx = await model.createContext({ contextSize: 512, threads });
const seq = ctx.getSequence();
process.stdout.write('READY\n');
const t0 = performance.now();
let t1 = 0;
const made: number[] = [];
for await (const tok of seq.evaluate(ids as never, { temperature: 0 } as never)) {
  if (made.push(tok as number) === 1) { t1 = performance.now(); process.stdout.write('FIRST\n'); }
  if (made.length >= decode) break;
}
const t2 = performance.now();
process.stdout.write(JSON.stringify({ promptTokens: ids.length, newTokens: made.length, tokens: made, prefillSeconds: (t1 - t0) / 1000, decodeSeconds: (t2 - t1) / 1000 }) + '\n');
await ctx.dispose();
await model.dispose();
process.exit(0);
