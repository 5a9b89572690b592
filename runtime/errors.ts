/** An error meant for the user: the CLI prints its message alone (no stack), then exits non-zero. */
export class QaloraError extends Error {
  readonly userFacing = true;
  constructor(message: string) {
    super(message);
    this.name = 'QaloraError';
  }
}
