// Host entry points (docs/ARCHITECTURE.md ABI), one template per operation instantiated by each
// specialization. Every pointer is device memory (a backend-owned tensor, or an array the addon staged);
// launches are queued on the stream and nothing here waits for them: the caller syncs when it reads back.
#pragma once

namespace qalora {
namespace QL_BACKEND_NS {
namespace host {

constexpr int kAuxThreads = 256;
// Rows of x one GEMV launch keeps in registers (M = 1 has its own instantiation). More rows per launch means
// fewer passes over W but a longer unrolled body: 8 keeps ptxas/cicc time and registers modest.
constexpr int kGemvRows = 8;

inline kern::DropoutArgs dropout_of(const LayerArgs& a) {
  const bool active = a.training != 0 && a.dropout > 0.0f;
  return kern::DropoutArgs{a.dropout, active ? 1.0f / (1.0f - a.dropout) : 1.0f, active ? 1 : 0, a.seed};
}

template <class K>
void set_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    ql::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes),
              "cudaFuncSetAttribute(max dynamic shared memory)");
}

// C::scale is the storage of α and β (float, or fp16 bits): staged as they are, never widened on the host.
template <class C>
void quantize(const float* w, int64_t out, int64_t in, uint32_t* qweight, typename C::scale* alpha,
              typename C::scale* beta) {
  if (out <= 0 || in <= 0) return;
  const int64_t L = in / C::group;
  auto stats = kern::quantize_stats_kernel<C>;
  QL_LAUNCH(stats, ql::ceil_div(out * L * 32, kAuxThreads), kAuxThreads, 0, 0)(w, out, in, alpha, beta);
  ql::launched("quantize_stats_kernel");
  auto pack = kern::pack_kernel<C>;
  QL_LAUNCH(pack, ql::ceil_div(out * ((in + 31) / 32) * 32, kAuxThreads), kAuxThreads, 0, 0)(w, out, in, alpha, beta, qweight);
  ql::launched("pack_kernel");
}

template <class C>
void dequantize(const uint32_t* qweight, const typename C::scale* alpha, const typename C::scale* beta, int64_t out,
                int64_t in, float* w) {
  if (out <= 0 || in <= 0) return;
  auto k = kern::dequantize_kernel<C>;
  QL_LAUNCH(k, ql::ceil_div(out * in, kAuxThreads), kAuxThreads, 0, 0)(qweight, alpha, beta, out, in, w);
  ql::launched("dequantize_kernel");
}

// The layer's arrays as the kernels' parameter blocks take them; S is the specialization's scale storage.
template <class S>
struct Weights {
  const uint32_t* qweight;
  const S* alpha;
  const S* beta;
  const float* lora_a;
  const float* lora_b;
  explicit Weights(const LayerArgs& a)
      : qweight(a.qweight), alpha(static_cast<const S*>(a.alpha)), beta(static_cast<const S*>(a.beta)),
        lora_a(a.rank > 0 ? a.lora_a : nullptr), lora_b(a.rank > 0 ? a.lora_b : nullptr) {}
};

template <class C, bool TRANS>
void launch_gemm(const kern::GemmParams<typename C::act, typename C::scale>& gp) {
  using T = kern::Tile<C, TRANS>;
  auto k = kern::gemm_kernel<C, TRANS>;
  set_smem(k, T::smem_bytes);
  const int64_t n = TRANS ? gp.in : gp.out;
  QL_LAUNCH(k, dim3(ql::ceil_div(n, T::BN), ql::ceil_div(gp.m, T::BM)), T::THREADS, T::smem_bytes, 0)(gp);
  ql::launched(TRANS ? "gemm_kernel<dx>" : "gemm_kernel<y>");
}

template <class C, int MR>
void launch_gemv(const kern::GemvParams<typename C::act, typename C::scale>& gp) {
  auto k = kern::gemv_kernel<C, MR>;
  QL_LAUNCH(k, ql::ceil_div(gp.out, C::gemv_rows_per_block), C::gemv_threads, 0, 0)(gp);
  ql::launched("gemv_kernel");
}

template <class C>
void forward(const LayerArgs& a, const void* x, void* y) {
  using act = typename C::act;
  if (a.m <= 0 || a.out <= 0) return;
  const int64_t L = a.in / C::group;
  const int rank = a.rank > 0 ? (int)a.rank : 0;
  const bool gemv = a.m <= C::gemv_max_rows;
  const Weights<typename C::scale> w(a);
  const act* dx = static_cast<const act*>(x);
  act* dy = static_cast<act*>(y);
  ql::DeviceBuffer<float> pooled(rank ? a.m * L : 0), h(a.m * rank);
  if (rank > 0) {
    kern::PoolParams<act> pp{dx, w.lora_a, pooled.ptr, h.ptr, a.m, a.in, rank, a.pool_scale, dropout_of(a)};
    auto k = kern::pool_kernel<C>;
    QL_LAUNCH(k, (unsigned)a.m, kAuxThreads, 0, 0)(pp);
    ql::launched("pool_kernel");
  }
  if (gemv) {
    kern::GemvParams<act, typename C::scale> gp{dx, w.qweight, w.alpha, w.beta, w.lora_b, h.ptr, dy,
                             a.m, a.in, a.out, rank, a.scale};
    if (a.m == 1) {
      launch_gemv<C, 1>(gp);
    } else {  // register blocks of kGemvRows rows; each block of rows streams W once
      for (int64_t r0 = 0; r0 < a.m; r0 += kGemvRows) {
        kern::GemvParams<act, typename C::scale> part = gp;
        part.x += r0 * a.in;
        part.h += r0 * rank;
        part.y += r0 * a.out;
        part.m = a.m - r0 < kGemvRows ? a.m - r0 : kGemvRows;
        launch_gemv<C, kGemvRows>(part);
      }
    }
  } else {
    kern::GemmParams<act, typename C::scale> gp{dx, w.qweight, w.alpha, w.beta, w.lora_b, h.ptr, nullptr, dy,
                             a.m, a.in, a.out, rank, a.scale, dropout_of(a)};
    launch_gemm<C, false>(gp);
  }
}

template <class C>
void backward(const LayerArgs& a, const void* x, const void* dy, void* dx, float* grad_a, float* grad_b) {
  using act = typename C::act;
  if (a.m <= 0 || a.in <= 0) return;
  const int64_t L = a.in / C::group;
  const int rank = a.rank > 0 ? (int)a.rank : 0;
  const Weights<typename C::scale> w(a);
  const act* xin = static_cast<const act*>(x);
  const act* ddy = static_cast<const act*>(dy);
  act* ddx = static_cast<act*>(dx);
  ql::DeviceBuffer<float> pooled(a.m * L * (rank ? 1 : 0)), h(a.m * rank);
  ql::DeviceBuffer<float> dh(a.m * rank), dpx(a.m * L * (rank ? 1 : 0));
  const kern::DropoutArgs drop = dropout_of(a);
  if (rank > 0) {
    kern::PoolParams<act> pp{xin, w.lora_a, pooled.ptr, h.ptr, a.m, a.in, rank, a.pool_scale, drop};
    auto pool = kern::pool_kernel<C>;
    QL_LAUNCH(pool, (unsigned)a.m, kAuxThreads, 0, 0)(pp);
    ql::launched("pool_kernel");
    kern::LoraGradParams<act> lp{ddy, w.lora_a, w.lora_b, pooled.ptr, h.ptr, dh.ptr, dpx.ptr, a.m, a.in, a.out, L, rank, a.scale, a.pool_scale, drop};
    auto k_dh = kern::lora_dh_kernel<C>;
    QL_LAUNCH(k_dh, (unsigned)a.m, kAuxThreads, 0, 0)(lp);
    ql::launched("lora_dh_kernel");
    // Row chunks of the dA/dB reductions: enough blocks to fill the GPU, each chunk ≥ 256 rows.
    const int chunks = (int)(a.m < 256 ? 1 : (a.m / 256 < 64 ? a.m / 256 : 64));
    const int64_t rows = (a.m + chunks - 1) / chunks, nb = a.out * rank, na = (int64_t)rank * L;
    ql::DeviceBuffer<float> partial(chunks * (nb > na ? nb : na));
    const kern::ChunkArgs ch{partial.ptr, rows};
    auto reduce = kern::lora_reduce_kernel<C>;
    auto k_gb = kern::lora_grad_b_kernel<C>;
    QL_LAUNCH(k_gb, dim3(ql::ceil_div(nb, kAuxThreads), chunks), kAuxThreads, 0, 0)(lp, ch);
    ql::launched("lora_grad_b_kernel");
    QL_LAUNCH(reduce, ql::ceil_div(nb, kAuxThreads), kAuxThreads, 0, 0)(partial.ptr, chunks, nb, a.scale, grad_b);
    ql::launched("lora_reduce_kernel");
    auto k_ga = kern::lora_grad_a_kernel<C>;
    QL_LAUNCH(k_ga, dim3(ql::ceil_div(na, kAuxThreads), chunks), kAuxThreads, 0, 0)(lp, ch);
    ql::launched("lora_grad_a_kernel");
    QL_LAUNCH(reduce, ql::ceil_div(na, kAuxThreads), kAuxThreads, 0, 0)(partial.ptr, chunks, na, 1.0f, grad_a);
    ql::launched("lora_reduce_kernel");
    auto k_dp = kern::lora_dpx_kernel<C>;
    QL_LAUNCH(k_dp, ql::ceil_div(a.m * L, kAuxThreads), kAuxThreads, 0, 0)(lp);
    ql::launched("lora_dpx_kernel");
  }
  kern::GemmParams<act, typename C::scale> gp{ddy, w.qweight, w.alpha, w.beta, nullptr, nullptr,
                           rank ? dpx.ptr : nullptr, ddx, a.m, a.in, a.out, rank, a.scale, drop};
  launch_gemm<C, true>(gp);
}

template <class C>
void merge(const LayerArgs& a, typename C::scale* beta_out) {
  using S = typename C::scale;
  if (a.out <= 0) return;
  const int64_t L = a.in / C::group;
  const int rank = a.rank > 0 ? (int)a.rank : 0;
  if (rank == 0) {
    ql::copy_device(beta_out, a.beta, sizeof(S) * a.out * L);
    return;
  }
  auto k = kern::merge_kernel<C>;
  QL_LAUNCH(k, ql::ceil_div(a.out * L, kAuxThreads), kAuxThreads, 0, 0)(static_cast<const S*>(a.beta), a.lora_a, a.lora_b,
                                                                         a.out, L, rank, a.scale * a.pool_scale, beta_out);
  ql::launched("merge_kernel");
}

}  // namespace host
}  // namespace QL_BACKEND_NS
}  // namespace qalora
