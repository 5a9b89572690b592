// PTX and SASS per kernel for `qalora inspect --ptx / --sass`. The PTX is the one nvcc generated for the cubin
// (kept with -keep); the SASS comes from cuobjdump -sass, or nvdisasm, on that cubin, whichever the toolkit has
// (neither ships with the pip/CI toolkit used here: then --sass says so instead of printing nothing).
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { QaloraError } from '../runtime/errors.ts';

/** One kernel's listing, keyed by its mangled name. */
export interface Listing {
  mangled: string;
  text: string;
}

/** The `.entry` functions of a PTX file, each from its `.entry` line to its closing brace. */
export function ptxEntries(ptx: string): Listing[] {
  const out: Listing[] = [];
  const lines = ptx.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const m = /^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+(\w+)\s*\(/.exec(lines[i]);
    if (!m) continue;
    let end = i;
    while (end < lines.length && lines[end] !== '}') end++;
    out.push({ mangled: m[1], text: lines.slice(i, end + 1).join('\n') });
    i = end;
  }
  return out;
}

/**
 * Splits a SASS dump into functions: cuobjdump prints `Function : NAME` before each, nvdisasm a
 * `.section .text.NAME` directive.
 */
export function sassFunctions(dump: string): Listing[] {
  const out: Listing[] = [];
  let cur: Listing | null = null;
  for (const line of dump.split('\n')) {
    const m = /^\s*Function : (\S+)/.exec(line) ?? /^\s*\.section\s+\.text\.([^,\s]+)/.exec(line);
    if (m) out.push((cur = { mangled: m[1], text: '' }));
    if (cur) cur.text += line + '\n';
  }
  return out.map((l) => ({ ...l, text: l.text.trimEnd() }));
}

/** cuobjdump or nvdisasm next to nvcc, in $CUDA_HOME/bin or on PATH; null when neither exists. */
export function sassTool(nvcc: string): { tool: string; args: (cubin: string) => string[] } | null {
  const dirs = [dirname(nvcc), join(process.env.CUDA_HOME ?? '/usr/local/cuda', 'bin'), ...(process.env.PATH ?? '').split(':')];
  for (const [name, args] of [
    ['cuobjdump', (c: string) => ['-sass', c]],
    ['nvdisasm', (c: string) => ['-c', '-g', c]],
  ] as const) {
    const found = dirs.map((d) => join(d, name)).find((p) => existsSync(p));
    if (found) return { tool: found, args };
  }
  return null;
}

export function disassemble(nvcc: string, cubin: string): Listing[] {
  const t = sassTool(nvcc);
  if (!t) throw new QaloraError(`--sass needs cuobjdump or nvdisasm from the CUDA toolkit; neither is next to ${nvcc}, in $CUDA_HOME/bin or on PATH`);
  const r = spawnSync(t.tool, t.args(cubin), { encoding: 'utf8', maxBuffer: 1 << 28 });
  if (r.status !== 0) throw new QaloraError(`${t.tool} failed on ${cubin}: ${r.stderr || r.error?.message}`);
  return sassFunctions(r.stdout);
}
