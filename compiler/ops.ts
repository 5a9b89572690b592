// Fixed native ops (core ops, probes) are declared once, in JSON descriptors (templates/{core,cpu}/*.ops.json);
// from them the compiler emits the C++ prototypes, the N-API wrappers and the TypeScript types, so nobody writes
// glue by hand and the three cannot disagree.
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

export const ARRAY_TYPES = {
  'f32[]': { cpp: 'float', dtype: 'f32', napi: 'napi_float32_array' },
  'u16[]': { cpp: 'uint16_t', dtype: 'u16', napi: 'napi_uint16_array' },
  'u32[]': { cpp: 'uint32_t', dtype: 'u32', napi: 'napi_uint32_array' },
  'i32[]': { cpp: 'int32_t', dtype: 'i32', napi: 'napi_int32_array' },
  'u8[]': { cpp: 'uint8_t', dtype: 'u8', napi: 'napi_uint8_array' },
} as const;
export const SCALAR_TYPES = {
  i32: { cpp: 'int32_t', ts: 'number' },
  i64: { cpp: 'int64_t', ts: 'number' },
  u64: { cpp: 'uint64_t', ts: 'number | bigint' },
  f32: { cpp: 'float', ts: 'number' },
  f64: { cpp: 'double', ts: 'number' },
  bool: { cpp: 'bool', ts: 'boolean' },
} as const;
export type ArrayType = keyof typeof ARRAY_TYPES;
export type ScalarType = keyof typeof SCALAR_TYPES;

export interface OpArg {
  name: string;
  type: ArrayType | ScalarType;
  /** Arrays only: the C++ parameter is `const T*`. */
  const?: boolean;
  /** Arrays only, optional: the exact element count as an expression over scalar args, e.g. "rows * dim". */
  len?: string;
}

export interface OpDescriptor {
  name: string;
  doc?: string;
  cpp: string;
  args: OpArg[];
  returns: 'void' | 'f64';
  /**
   * Also implemented on the GPU as qalora::<cuda|emu>::core::<fn> (templates/cuda/core.cu), same signature; the
   * addon then exposes it as coreOn.<backend>.<name> as well. Only for ops named qalora::core::<fn>.
   */
  cuda?: boolean;
  /** Where it was declared, for error messages. */
  source: string;
}

const IDENT = /^[A-Za-z_][A-Za-z0-9_]*$/;

export function isArrayType(t: string): t is ArrayType {
  return t in ARRAY_TYPES;
}

function fail(where: string, msg: string): never {
  throw new Error(`${where}: ${msg}`);
}

function checkLenExpr(expr: string, scalars: Set<string>, where: string): void {
  if (!/^[A-Za-z0-9_+\-*/() ]+$/.test(expr)) fail(where, `len "${expr}" may use only scalar argument names, integers, + - * / ( )`);
  for (const id of expr.match(/[A-Za-z_][A-Za-z0-9_]*/g) ?? []) {
    if (!scalars.has(id)) fail(where, `len "${expr}" names "${id}", which is not an integer scalar argument`);
  }
}

/** Validates one descriptor file's content; throws naming the file, the op and the field that is wrong. */
export function parseOpDescriptors(json: unknown, source: string): OpDescriptor[] {
  if (!Array.isArray(json)) fail(source, 'expected a JSON array of op descriptors');
  return json.map((raw, i) => {
    const at = `${source}[${i}]`;
    if (!raw || typeof raw !== 'object') fail(at, 'expected an object');
    const d = raw as Record<string, unknown>;
    if (typeof d.name !== 'string' || !IDENT.test(d.name)) fail(at, `"name" must be a C identifier, got ${JSON.stringify(d.name)}`);
    const where = `${source} op ${d.name}`;
    if (typeof d.cpp !== 'string' || !/^[A-Za-z_][A-Za-z0-9_]*(::[A-Za-z_][A-Za-z0-9_]*)+$/.test(d.cpp))
      fail(where, `"cpp" must be a namespaced C++ function name like qalora::core::${d.name}, got ${JSON.stringify(d.cpp)}`);
    const returns = d.returns ?? 'void';
    if (returns !== 'void' && returns !== 'f64') fail(where, `"returns" must be "void" or "f64", got ${JSON.stringify(returns)}`);
    if (!Array.isArray(d.args)) fail(where, '"args" must be an array');
    const names = new Set<string>();
    const args = d.args.map((a: unknown, j: number) => {
      const arg = a as Record<string, unknown>;
      const aw = `${where} arg ${j}`;
      if (!arg || typeof arg.name !== 'string' || !IDENT.test(arg.name)) fail(aw, `"name" must be an identifier`);
      if (names.has(arg.name)) fail(aw, `duplicate argument "${arg.name}"`);
      names.add(arg.name);
      if (typeof arg.type !== 'string' || !(isArrayType(arg.type) || arg.type in SCALAR_TYPES))
        fail(aw, `"${arg.name}" has type ${JSON.stringify(arg.type)}; expected one of ${[...Object.keys(ARRAY_TYPES), ...Object.keys(SCALAR_TYPES)].join(' ')}`);
      if ((arg.const !== undefined || arg.len !== undefined) && !isArrayType(arg.type)) fail(aw, `"const"/"len" apply to array arguments only ("${arg.name}" is ${arg.type})`);
      return { name: arg.name, type: arg.type, const: arg.const === true ? true : undefined, len: typeof arg.len === 'string' ? arg.len : undefined } as OpArg;
    });
    if (d.cuda !== undefined && typeof d.cuda !== 'boolean') fail(where, `"cuda" must be true or false, got ${JSON.stringify(d.cuda)}`);
    if (d.cuda === true && !/^qalora::core::[A-Za-z_][A-Za-z0-9_]*$/.test(d.cpp))
      fail(where, `"cuda": true needs "cpp" to be qalora::core::<fn> (the GPU twin is qalora::<backend>::core::<fn>), got ${JSON.stringify(d.cpp)}`);
    const intScalars = new Set(args.filter((a) => ['i32', 'i64', 'u64'].includes(a.type)).map((a) => a.name));
    for (const a of args) if (a.len) checkLenExpr(a.len, intScalars, `${where} arg ${a.name}`);
    return { name: d.name, doc: typeof d.doc === 'string' ? d.doc : undefined, cpp: d.cpp, args, returns, cuda: d.cuda === true ? true : undefined, source } as OpDescriptor;
  });
}

/** All descriptors under templates/{core,cpu}; names must be unique across files. */
export function loadOpDescriptors(templateRoot: string, dirs: readonly string[] = ['core', 'cpu']): OpDescriptor[] {
  const all: OpDescriptor[] = [];
  const seen = new Map<string, string>();
  for (const dir of dirs) {
    const abs = join(templateRoot, dir);
    if (!existsSync(abs)) continue;
    for (const f of readdirSync(abs).filter((n) => n.endsWith('.ops.json')).sort()) {
      const source = `templates/${dir}/${f}`;
      let json: unknown;
      try {
        json = JSON.parse(readFileSync(join(abs, f), 'utf8'));
      } catch (e) {
        fail(source, `invalid JSON: ${(e as Error).message}`);
      }
      for (const op of parseOpDescriptors(json, source)) {
        const prev = seen.get(op.name);
        if (prev) fail(source, `op "${op.name}" is already declared in ${prev}`);
        seen.set(op.name, source);
        all.push(op);
      }
    }
  }
  return all;
}

/** `float* x` / `const float* x` / `int64_t n`. */
export function cppParam(a: OpArg): string {
  if (isArrayType(a.type)) return `${a.const ? 'const ' : ''}${ARRAY_TYPES[a.type].cpp}* ${a.name}`;
  return `${SCALAR_TYPES[a.type].cpp} ${a.name}`;
}

/** The TypeScript type of an argument (compiler/native-api.ts): an array takes a host array or a device tensor of its dtype. */
export function tsType(a: OpArg): string {
  return isArrayType(a.type) ? `Tensor<'${ARRAY_TYPES[a.type].dtype}'>` : SCALAR_TYPES[a.type].ts;
}

// Everything the addon template needs to emit one core-op wrapper, prepared here so the template stays C++.
export function opWrapperContext(op: OpDescriptor) {
  const [ns, fn] = [op.cpp.slice(0, op.cpp.lastIndexOf('::')), op.cpp.slice(op.cpp.lastIndexOf('::') + 2)];
  const reads: Record<string, string> = {
    i32: 'int_arg', i64: 'int_arg', u64: 'u64_arg', f32: 'number_arg', f64: 'number_arg', bool: 'bool_arg',
  };
  const scalars = op.args
    .map((a, index) => ({ a, index }))
    .filter(({ a }) => !isArrayType(a.type))
    .map(({ a, index }) => {
      const cpp = SCALAR_TYPES[a.type as keyof typeof SCALAR_TYPES].cpp;
      const read = `${reads[a.type]}(info[${index}], fn, "${a.name}")`;
      return { name: a.name, cpp, read: a.type === 'i32' || a.type === 'f32' ? `(${cpp})${read}` : read };
    });
  const arrays = op.args
    .map((a, index) => ({ a, index }))
    .filter(({ a }) => isArrayType(a.type))
    .map(({ a, index }) => {
      const t = ARRAY_TYPES[a.type as keyof typeof ARRAY_TYPES];
      return {
        name: a.name,
        index,
        elem: t.cpp,
        cpp: a.const ? `const ${t.cpp}` : t.cpp,
        napi: t.napi,
        len: a.len ? `(int64_t)(${a.len.replace(/[A-Za-z_][A-Za-z0-9_]*/g, (id) => `a_${id}`)})` : 'kAnyLength',
        lenWhy: a.len ?? '',
        // Staging on a GPU backend uploads what the op reads and downloads what it may write (non-const: in-out).
        access: a.const ? 'In' : 'InOut',
      };
    });
  return {
    ...op,
    ns,
    fn,
    cppReturn: op.returns === 'f64' ? 'double' : 'void',
    params: op.args.map(cppParam).join(', '),
    call: op.args.map((a) => `a_${a.name}`).join(', '),
    scalars,
    arrays,
  };
}
