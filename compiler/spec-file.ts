// Loading a spec file for the CLI: diagnostics (warnings included) go to stderr in the DSL's own format, and
// an error stops the command with a user-facing error, so each command does not repeat this.
import { formatDiagnostics, loadSpec } from '../dsl/index.ts';
import type { ResolvedSpec } from '../dsl/resolved.ts';
import { QaloraError } from '../runtime/errors.ts';

export function loadSpecOrFail(path: string, stderr: NodeJS.WritableStream = process.stderr): ResolvedSpec {
  const result = loadSpec(path);
  if (result.diagnostics.length) stderr.write(formatDiagnostics(result.diagnostics, result.sources) + '\n');
  if (!result.spec) {
    const errors = result.diagnostics.filter((d) => d.severity === 'error').length;
    throw new QaloraError(`${path}: ${errors} error${errors === 1 ? '' : 's'} in the spec; nothing was compiled`);
  }
  return result.spec;
}
