// Data parallelism for the trainer: N ranks, one model replica each. Every optimizer step, rank r trains on
// windows [r·B, (r+1)·B) of the step's global batch of N·B windows (so the union over ranks is exactly the
// single-process batch for the same seed), the per-rank sums of loss, target count and gradients are added in
// rank order, and each rank applies the identical AdamW update. Rank 0 alone writes files and talks to the user.
import { mixSeed } from '../data/dataset.ts';
import { QaloraError } from '../errors.ts';
import { launchedRank, loadMpi, type MpiAddon } from '../mpi.ts';
import type { AdamW } from './adamw.ts';
import type { TrainerState } from './checkpoint.ts';
import type { ParamRef } from './params.ts';

/** Seconds a collective may wait for the other ranks (rank 0 validating or checkpointing counts as waiting). */
const DEFAULT_TIMEOUT_S = 1800;
/** Steps between checks that every rank holds the same adapters and optimizer moments. */
export const SYNC_CHECK_EVERY = 10;

export class DataParallel {
  private flat?: Float32Array;

  constructor(
    private readonly mpi: MpiAddon,
    readonly rank: number,
    readonly size: number,
  ) {}

  get isRoot(): boolean {
    return this.rank === 0;
  }

  /** Sums the step's gradients (in place) and its scalar sums over the ranks. */
  reduceStep(grads: Float32Array[], scalars: { sum: number; count: number; positions: number }): { sum: number; count: number; positions: number } {
    const n = grads.reduce((s, g) => s + g.length, 0);
    if (this.flat?.length !== n) this.flat = new Float32Array(n);
    const flat = this.flat;
    let off = 0;
    for (const g of grads) flat.set(g, (off += g.length) - g.length);
    this.mpi.allreduceSum(flat);
    off = 0;
    for (const g of grads) g.set(flat.subarray(off, (off += g.length)));
    // Float64, not in the Float32 buffer: the loss sum needs its precision.
    const s = new Float64Array([scalars.sum, scalars.count, scalars.positions]);
    this.mpi.allreduceSum(s);
    return { sum: s[0], count: s[1], positions: s[2] };
  }

  /** True on every rank when it is true on any (a Ctrl-C or stop request seen by one rank stops all together). */
  any(flag: boolean): boolean {
    const f = new Float64Array([flag ? 1 : 0]);
    this.mpi.allreduceSum(f);
    return f[0] > 0;
  }

  /**
   * Makes every rank start from rank 0's adapters, optimizer moments and trainer state (rank 0 alone may have
   * read a checkpoint: on several hosts the others cannot see its disk).
   */
  syncFromRoot(params: ParamRef[], opt: AdamW, state: TrainerState): TrainerState {
    for (const t of [...params.map((p) => p.data), ...opt.m, ...opt.v]) this.mpi.broadcast(t, 0);
    const json = this.broadcastBytes(this.isRoot ? Buffer.from(JSON.stringify({ state, adamT: opt.t })) : Buffer.alloc(0));
    const got = JSON.parse(json.toString('utf8')) as { state: TrainerState; adamT: number };
    opt.t = got.adamT;
    return got.state;
  }

  /** Stops every rank with the same error when one holds different adapters or moments than rank 0. */
  checkInSync(step: number, params: ParamRef[], opt: AdamW): void {
    const mine = checksum([...params.map((p) => p.data), ...opt.m, ...opt.v]);
    // Each rank fills its own slot; the sum is then everyone's checksum on every rank.
    const all = new Float64Array(this.size);
    all[this.rank] = mine;
    this.mpi.allreduceSum(all);
    const bad = [...all].map((c, r) => (c === all[0] ? -1 : r)).filter((r) => r >= 0);
    if (bad.length > 0) {
      throw new QaloraError(
        `step ${step}: the adapters or optimizer state of rank${bad.length > 1 ? 's' : ''} ${bad.join(', ')} differ from rank 0's ` +
          `(checksums ${[...all].map((c) => c.toString(16)).join(', ')}); the ranks no longer train the same model — ` +
          'every rank must run the same qalora version, spec, data and flags',
      );
    }
  }

  /**
   * The dropout seed of this rank's part of a micro-batch. Dropout masks are keyed by the row within a kernel
   * call, so rank r's rows cannot reuse the single-process masks of the same windows; rank 0 keeps the
   * single-process stream and the others get their own. Runs with dropout > 0 thus match a single process in
   * distribution, not bit for bit (with dropout 0 they match to rounding).
   */
  dropoutSeed(seed: number): number {
    return this.rank === 0 ? seed : mixSeed(seed, this.rank);
  }

  /** Reports an error from this rank and ends the whole job (no rank is left waiting in a collective). */
  fail(e: unknown): never {
    const msg = e instanceof Error ? (e as Error & { userFacing?: boolean }).userFacing ? e.message : (e.stack ?? e.message) : String(e);
    process.stderr.write(`qalora: rank ${this.rank} of ${this.size}: ${msg}\n`);
    this.mpi.abort(1);
  }

  finalize(): void {
    this.mpi.finalize();
  }

  private broadcastBytes(mine: Buffer): Buffer {
    const len = new Float64Array([mine.length]);
    this.mpi.broadcast(len, 0);
    const buf = this.isRoot ? mine : Buffer.alloc(len[0]);
    this.mpi.broadcast(buf, 0);
    return buf;
  }
}

/** FNV-1a over the float bits: exact (any differing bit shows), and a 32-bit integer survives the f64 sum. */
function checksum(tensors: Float32Array[]): number {
  let h = 0x811c9dc5;
  for (const t of tensors) {
    const u = new Uint32Array(t.buffer, t.byteOffset, t.length);
    for (let i = 0; i < u.length; i++) h = Math.imul(h ^ u[i], 0x01000193);
  }
  return h >>> 0;
}

/**
 * The job this process belongs to when mpirun started it with more than one rank; null otherwise (also under
 * `mpirun -n 1`), so a single process never needs MPI.
 */
export async function dataParallelFromEnv(): Promise<DataParallel | null> {
  const launched = launchedRank();
  if (!launched || launched.size <= 1) return null;
  const mpi = await loadMpi();
  const timeout = Number(process.env.QALORA_MPI_TIMEOUT ?? DEFAULT_TIMEOUT_S);
  const { rank, size } = mpi.init(Number.isFinite(timeout) ? timeout : DEFAULT_TIMEOUT_S);
  return new DataParallel(mpi, rank, size);
}
