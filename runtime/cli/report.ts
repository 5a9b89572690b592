// What long commands tell the user on stderr besides their own output: the spec a quantized file implied (so
// the user sees, and can copy into a .qal file, what is running) and the peak memory of the process.
import { formatBytes } from '../progress.ts';

/** "spec: implied by the file's blocks" followed by one line per projection; nothing when a spec was given. */
export function announceImpliedSpec(implied: string | undefined, write: (s: string) => void = (s) => process.stderr.write(s)): void {
  if (!implied) return;
  write(`spec: none given; the file's quantized blocks imply (pass --spec to choose other settings):\n${implied.replace(/^/gm, '  ')}\n`);
}

/** Peak resident memory of this process so far (the kernel's high-water mark, ru_maxrss). */
export function peakRssBytes(): number {
  return process.resourceUsage().maxRSS * 1024;
}

export function reportPeakMemory(write: (s: string) => void = (s) => process.stderr.write(s)): void {
  const peak = peakRssBytes();
  write(`peak memory: ${formatBytes(peak)} resident (${peak} bytes)\n`);
}
