// Core (non-QA-LoRA) ops of the LLaMA runtime: float GEMM, embedding, RMSNorm, RoPE, causal GQA attention,
// SwiGLU, softmax cross-entropy, residual adds and fp16/bf16 casts. Declared for JS in core.ops.json.
// All tensors are row-major fp32 unless named otherwise; "overwrite" unless an op says it accumulates.
#pragma once
#include <cstdint>

namespace qalora::core {

// C[m,n] = op(A)·op(B) (+ C when accumulate). A is [m,k] (transA: stored [k,m]); B is [k,n] (transB: [n,k]).
void gemm(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k, bool trans_a, bool trans_b,
          bool accumulate);

// C[m,n] = A·op(B) (+ C) with B as fp16 (bf16 when `bf16`) bits: a token table in its file's half type.
void gemm_half(const float* a, const uint16_t* b, float* c, int64_t m, int64_t n, int64_t k, bool trans_b, bool bf16,
               bool accumulate);

void embedding_forward(const float* table, const int32_t* ids, float* out, int64_t n, int64_t vocab, int64_t dim);
// out[i] = table[ids[i]] widened from fp16 (bf16 when `bf16`) bits.
void embedding_forward_half(const uint16_t* table, const int32_t* ids, float* out, int64_t n, int64_t vocab,
                            int64_t dim, bool bf16);
void embedding_backward(const int32_t* ids, const float* dout, float* dtable, int64_t n, int64_t vocab, int64_t dim);

void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, int64_t rows, int64_t dim, float eps);
void rmsnorm_backward(const float* x, const float* w, const float* rstd, const float* dy, float* dx, int64_t rows,
                      int64_t dim);

void rope_forward(float* x, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, float theta,
                  bool rotate_half);
void rope_backward(float* dx, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, float theta,
                   bool rotate_half);

void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse, int64_t batch,
                       int64_t tq, int64_t tk, int64_t heads, int64_t kv_heads, int64_t head_dim);
// K and V as fp16 bits (the GPU backends' KV cache); on the CPU a reference that widens them and runs the above.
void attention_forward_kv16(const float* q, const uint16_t* k, const uint16_t* v, float* out, float* lse, int64_t batch,
                            int64_t tq, int64_t tk, int64_t heads, int64_t kv_heads, int64_t head_dim);
void attention_backward(const float* q, const float* k, const float* v, const float* out, const float* lse,
                        const float* dout, float* dq, float* dk, float* dv, int64_t batch, int64_t tq, int64_t tk,
                        int64_t heads, int64_t kv_heads, int64_t head_dim);

void swiglu_forward(const float* gate, const float* up, float* out, int64_t n);
void swiglu_backward(const float* gate, const float* up, const float* dout, float* dgate, float* dup, int64_t n);

double cross_entropy_forward(const float* logits, const int32_t* targets, int64_t n, int64_t vocab);
double cross_entropy_backward(const float* logits, const int32_t* targets, int64_t n, int64_t vocab, float scale,
                              float* dlogits);

void add_inplace(float* y, const float* x, int64_t n);
void f32_to_f16(const float* x, uint16_t* y, int64_t n);
void f16_to_f32(const uint16_t* x, float* y, int64_t n);
void f32_to_bf16(const float* x, uint16_t* y, int64_t n);
void bf16_to_f32(const uint16_t* x, float* y, int64_t n);

// AdamW over n parameters and a squared norm (optim.cpp; declared in optim.ops.json).
void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, double lr, double beta1, double beta2,
                  double eps, double decay, double grad_scale, double bc1, double bc2);
double sum_squares(const float* x, int64_t n);

}  // namespace qalora::core
