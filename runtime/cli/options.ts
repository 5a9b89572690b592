// Flags several commands share, written once so their help text agrees.
import { Option } from 'commander';
import { TABLE_TYPES } from '../../dsl/defaults.ts';

/** A quantized file (GGUF Q4_x/Q8_0, GPTQ) whose blocks differ from --spec is an error unless this is given. */
export function requantizeOption(): Option {
  return new Option('--requantize', "when the file's quantized blocks differ from --spec (bits, group): dequantize them and quantize again per the spec (lossy) instead of failing");
}

/** The token tables' type (CreateOptions.tables, a spec's `tables`). */
export function tablesOption(): Option {
  return new Option(
    '--tables <type>',
    "hold the token embedding and the classifier as: file (the checkpoint's own type, default), fp32, fp16, bf16, or ggml blocks " +
      "q8_0, q4_1, q4_0 (quantized as llama.cpp does; a GGUF export writes them as such); over the spec's `tables`",
  ).choices([...TABLE_TYPES]);
}

/** The decode GEMVs' activations (CreateOptions.activations). */
export function activationsOption(): Option {
  return new Option(
    '--activations <mode>',
    'what decoding multiplies the quantized weights with: fp32 (exact) or int8 (each token\'s activations quantized per 32 inputs, ' +
      'integer dot products as llama.cpp does: about 2x the decode speed on CPU for a small perplexity cost; CPU backend only)',
  ).choices(['fp32', 'int8']).default('fp32');
}
