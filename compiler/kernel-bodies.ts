// The code a specialization instantiates, as `qalora inspect` prints it: its region of kernels.cu only pins a
// Config, the kernels themselves are templates in the rendered headers (src/cuda/*.cuh). For each __global__
// kernel the cubin holds for the specialization, its definition, then the device functions its body calls
// (one level: gemm_kernel → run_tensor_cores / run_simt, gemv_kernel → load8, load_block, …).

export interface SourceFile {
  path: string;
  content: string;
}

export interface Definition {
  name: string;
  kind: 'kernel' | 'device';
  path: string;
  /** 1-based line of the first line shown (its leading comment or template line). */
  line: number;
  text: string;
  /** The function body, for finding what it calls. */
  body: string;
}

const START = /^(__global__|QL_DEV)\b/;

/** Strips a balanced `QL_LAUNCH_BOUNDS(...)` so the function name is the identifier before the next '('. */
function functionName(signature: string): string | null {
  const s = signature.replace(/QL_LAUNCH_BOUNDS\((?:[^()]|\([^()]*(?:\([^()]*\))*[^()]*\))*\)/, '');
  return /(\w+)\s*\(/.exec(s)?.[1] ?? null;
}

/** Every __global__ and QL_DEV function defined at the start of a line in `files`, by name (first definition wins). */
export function findDefinitions(files: SourceFile[]): Map<string, Definition> {
  const defs = new Map<string, Definition>();
  for (const f of files) {
    const lines = f.content.split('\n');
    for (let i = 0; i < lines.length; i++) {
      const m = START.exec(lines[i]);
      if (!m) continue;
      // The signature runs to the first '{' (a declaration ends at ';' first: not a definition).
      let j = i, signature = '';
      while (j < lines.length && !lines[j].includes('{') && !lines[j].includes(';')) signature += lines[j++] + '\n';
      if (j >= lines.length || !lines[j].includes('{')) continue;
      signature += lines[j].slice(0, lines[j].indexOf('{'));
      const name = functionName(signature);
      if (!name || defs.has(name)) continue;
      // Braces balance at the end of the body; line comments may hold stray braces, so they are dropped.
      let depth = 0, end = j;
      for (; end < lines.length; end++) {
        for (const c of lines[end].replace(/\/\/.*$/, '')) depth += c === '{' ? 1 : c === '}' ? -1 : 0;
        if (depth === 0 && end >= j) break;
      }
      let first = i;
      if (first > 0 && /^template\s*</.test(lines[first - 1])) first--;
      while (first > 0 && /^\s*\/\//.test(lines[first - 1])) first--;
      defs.set(name, {
        name,
        kind: m[1] === '__global__' ? 'kernel' : 'device',
        path: f.path,
        line: first + 1,
        text: lines.slice(first, end + 1).join('\n'),
        body: lines.slice(j, end + 1).join('\n'),
      });
    }
  }
  return defs;
}

/** The device functions a body calls by name (`f(` or `f<…>(`), in order of first call. */
function callees(def: Definition, defs: Map<string, Definition>): Definition[] {
  const seen = new Set<string>();
  for (const m of def.body.matchAll(/\b(\w+)\s*(?:<[^;{}()]*>)?\s*\(/g)) {
    const d = defs.get(m[1]);
    if (d && d.kind === 'device' && d.name !== def.name) seen.add(d.name);
  }
  return [...seen].map((n) => defs.get(n)!);
}

/**
 * The listing of `kernels` (base names as the cubin has them, e.g. gemm_kernel, pool_kernel), each with the
 * instantiations the specialization makes of it (`instances`: e.g. gemm_kernel → ['gemm_kernel<y>', 'gemm_kernel<dx>']).
 */
export function kernelBodies(files: SourceFile[], instances: Map<string, string[]>): string {
  const defs = findDefinitions(files);
  const shown = new Set<string>();
  const parts: string[] = [];
  const show = (d: Definition, why: string) => {
    if (shown.has(d.name)) return;
    shown.add(d.name);
    parts.push(`// ---- ${d.name} (${d.path}:${d.line}), ${why} ----\n${d.text}`);
  };
  for (const [name, as] of instances) {
    const d = defs.get(name);
    if (!d) {
      parts.push(`// ---- ${name}: no definition found in ${files.map((f) => f.path).join(', ')} ----`);
      continue;
    }
    show(d, `instantiated as ${as.join(', ')}`);
    for (const c of callees(d, defs)) show(c, `called by ${name}`);
  }
  return parts.join('\n\n');
}
