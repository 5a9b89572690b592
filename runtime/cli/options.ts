// Flags several commands share, written once so their help text agrees.
import { Option } from 'commander';

/** A quantized file (GGUF Q4_x/Q8_0, GPTQ) whose blocks differ from --spec is an error unless this is given. */
export function requantizeOption(): Option {
  return new Option('--requantize', "when the file's quantized blocks differ from --spec (bits, group): dequantize them and quantize again per the spec (lossy) instead of failing");
}
