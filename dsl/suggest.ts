// "Did you mean …?": edit distance for typos, plus the names other tools use for the same thing (HF config,
// llama2.c, PEFT, GGUF), since a newcomer is likely to type those.

/** Optimal-string-alignment distance: Levenshtein plus adjacent transpositions (`rnak` → `rank` is 1). */
export function editDistance(a: string, b: string): number {
  const m = a.length;
  const n = b.length;
  let prev2 = new Array<number>(n + 1).fill(0);
  let prev = Array.from({ length: n + 1 }, (_, j) => j);
  for (let i = 1; i <= m; i++) {
    const cur = new Array<number>(n + 1);
    cur[0] = i;
    for (let j = 1; j <= n; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      cur[j] = Math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) cur[j] = Math.min(cur[j], prev2[j - 2] + 1);
    }
    prev2 = prev;
    prev = cur;
  }
  return prev[n];
}

const ALIASES: Record<string, string> = {
  // llama shape
  hidden_size: 'dim', embedding_length: 'dim', d_model: 'dim', n_embd: 'dim', emb_dim: 'dim',
  intermediate: 'hidden', intermediate_size: 'hidden', hidden_dim: 'hidden', ffn_dim: 'hidden', ffn: 'hidden',
  feed_forward_length: 'hidden',
  n_layers: 'layers', n_layer: 'layers', num_layers: 'layers', num_hidden_layers: 'layers', block_count: 'layers',
  n_heads: 'heads', n_head: 'heads', num_heads: 'heads', num_attention_heads: 'heads', head_count: 'heads',
  n_kv_heads: 'kv_heads', num_key_value_heads: 'kv_heads', head_count_kv: 'kv_heads', kv: 'kv_heads',
  vocab_size: 'vocab', n_vocab: 'vocab',
  seq_len: 'context', max_seq_len: 'context', max_position_embeddings: 'context', context_length: 'context',
  n_ctx: 'context', ctx: 'context',
  rope_freq_base: 'rope_theta', freq_base: 'rope_theta', theta: 'rope_theta',
  rms_norm_eps: 'norm_eps', eps: 'norm_eps', layer_norm_rms_epsilon: 'norm_eps',
  // qalora settings
  group_size: 'group', qalora_group_size: 'group', groupsize: 'group', gs: 'group',
  r: 'rank', lora_r: 'rank', lora_rank: 'rank',
  lora_alpha: 'alpha', lora_dropout: 'dropout',
  wbits: 'bits', nbits: 'bits', bit: 'bits',
  pooling: 'pool', scale: 'scales', scale_dtype: 'scales', scales_dtype: 'scales', act_dtype: 'dtype', torch_dtype: 'dtype', activation: 'dtype',
  target_modules: 'adapters', adapter: 'adapters',
  in_features: 'in', out_features: 'out',
  arch: 'archs', cuda_archs: 'archs', gpu_archs: 'archs',
  // projections (HF, llama2.c)
  q_proj: 'q', k_proj: 'k', v_proj: 'v', o_proj: 'o', gate_proj: 'gate', up_proj: 'up', down_proj: 'down',
  wq: 'q', wk: 'k', wv: 'v', wo: 'o', w1: 'gate', w2: 'down', w3: 'up', all: 'all_linear',
  // values
  avg: 'mean', average: 'mean',
  float32: 'fp32', f32: 'fp32', float: 'fp32', float16: 'fp16', f16: 'fp16', half: 'fp16', bfloat16: 'bf16',
  gpu: 'cuda', nvidia: 'cuda', host: 'cpu',
};

/** The candidate the user most likely meant, or undefined when nothing is close. */
export function suggest(word: string, candidates: readonly string[]): string | undefined {
  const lower = word.toLowerCase();
  const alias = Object.hasOwn(ALIASES, lower) ? ALIASES[lower] : undefined;
  if (alias && candidates.includes(alias)) return alias;
  const exactIgnoringCase = candidates.find((c) => c.toLowerCase() === lower);
  if (exactIgnoringCase) return exactIgnoringCase;
  const limit = Math.max(1, Math.round(word.length * 0.34));
  let best: string | undefined;
  let bestDistance = limit + 1;
  for (const c of candidates) {
    const d = editDistance(lower, c.toLowerCase());
    if (d < bestDistance) {
      best = c;
      bestDistance = d;
    }
  }
  return best;
}

/** A hint: "did you mean `x`?" when something is close, otherwise the list of what is allowed. */
export function suggestionHint(word: string, candidates: readonly string[], what = 'expected one of'): string {
  const s = suggest(word, candidates);
  return s ? `did you mean \`${s}\`?` : `${what}: ${candidates.join(', ')}`;
}
