// The hand-written half of the N-API glue: the generic kernel wrappers over the argument helpers (napi_args.h)
// and the backends' memory (device_tensor.h). The generated half (addon.cpp) only lists which kernels and core
// ops exist.
#pragma once
#define NAPI_VERSION 8
#include <napi.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <string>

#include "qalora_common.h"
#include "napi_args.h"
#include "device_tensor.h"

namespace qalora::addon {

// ---- QA-LoRA kernels -------------------------------------------------------------------------------------
/// Element storage of activations (act) and of α/β (scales): F32 is Float32Array, U16 fp16/bf16 bits in a
/// Uint16Array.
enum class Act { F32, U16 };

struct KernelFns {
  const char* id;
  int bits;
  int64_t group;
  Act act;
  Act scales;
  void (*quantize)(const float*, int64_t, int64_t, uint32_t*, void*, void*);
  void (*dequantize)(const uint32_t*, const void*, const void*, int64_t, int64_t, float*);
  void (*forward)(const LayerArgs&, const void*, void*);
  void (*backward)(const LayerArgs&, const void*, const void*, void*, float*, float*);
  void (*merge)(const LayerArgs&, void*);
};

// One JS function's binding: the kernel table entry, its backend's memory (nullptr on the CPU) and its name for
// messages ("cpu.b4_g32_fp16_mean.forward"), built once at load time.
struct Bound {
  const KernelFns* k;
  const DeviceMemory* mem;
  std::string name;
};

inline int64_t checked_groups(Napi::Env env, const KernelFns& k, int64_t in, const char* fn) {
  if (in % k.group != 0)
    range_error(env, std::string(fn) + ": in = " + std::to_string(in) + " is not a multiple of the group size " + std::to_string(k.group));
  return in / k.group;
}

inline void* activation(CallContext& ctx, const Napi::Value& v, const KernelFns& k, const char* fn, const char* arg, int64_t rows,
                        int64_t cols, const char* dims, Access access) {
  auto why = [&] { return product(dims, rows, cols); };
  if (k.act == Act::F32) return ctx.array<float>(v, napi_float32_array, fn, arg, rows * cols, access, why);
  return ctx.array<uint16_t>(v, napi_uint16_array, fn, arg, rows * cols, access, why);
}

// α, β or β' [out, in/g] in the specialization's scale storage.
template <typename Why>
inline void* scales_arg(CallContext& ctx, const Napi::Value& v, const KernelFns& k, const char* fn, const char* arg, int64_t len,
                        Access access, Why why) {
  if (k.scales == Act::F32) return ctx.array<float>(v, napi_float32_array, fn, arg, len, access, why);
  return ctx.array<uint16_t>(v, napi_uint16_array, fn, arg, len, access, why);
}

// Reads the JS args object of forward/backward/merge into LayerArgs, checking every array against the sizes.
inline LayerArgs layer_args(CallContext& ctx, const Napi::Value& v, const KernelFns& k, const char* fn) {
  Napi::Env env = v.Env();
  if (!v.IsObject() || v.IsTypedArray() || v.IsArray()) type_error(env, std::string(fn) + ": argument 'args' must be an object, got " + describe(v));
  Napi::Object o = v.As<Napi::Object>();
  auto field = [&](const char* name) { return o.Get(name); };
  LayerArgs a{};
  a.m = int_arg(field("m"), fn, "args.m");
  a.in = int_arg(field("in"), fn, "args.in", 1);
  a.out = int_arg(field("out"), fn, "args.out", 1);
  a.rank = int_arg(field("rank"), fn, "args.rank");
  a.scale = (float)number_arg(field("scale"), fn, "args.scale");
  a.pool_scale = (float)number_arg(field("poolScale"), fn, "args.poolScale");
  a.dropout = (float)number_arg(field("dropout"), fn, "args.dropout");
  if (!(a.dropout >= 0.f && a.dropout < 1.f)) range_error(env, std::string(fn) + ": args.dropout must be in [0, 1), got " + std::to_string(a.dropout));
  a.training = bool_arg(field("training"), fn, "args.training") ? 1 : 0;
  a.seed = u64_arg(field("seed"), fn, "args.seed");
  const Napi::Value int8 = field("int8Activations");  // optional: absent is fp32
  a.int8_activations = int8.IsUndefined() ? 0 : bool_arg(int8, fn, "args.int8Activations") ? 1 : 0;
  if (a.int8_activations && std::strncmp(fn, "cpu.", 4) != 0)
    range_error(env, std::string(fn) + ": args.int8Activations is a mode of the CPU kernels only");
  const int64_t groups = checked_groups(env, k, a.in, fn);
  const int64_t words = words_per_row(a.in, k.bits);
  auto per_group = [&] { return product("out*(in/g)", a.out, groups); };
  a.qweight = ctx.array<uint32_t>(field("qweight"), napi_uint32_array, fn, "args.qweight", a.out * words, Access::In,
                                   [&] { return product("out*words_per_row(in, bits)", a.out, words); });
  a.alpha = scales_arg(ctx, field("alpha"), k, fn, "args.alpha", a.out * groups, Access::In, per_group);
  a.beta = scales_arg(ctx, field("beta"), k, fn, "args.beta", a.out * groups, Access::In, per_group);
  if (a.rank > 0) {
    a.lora_a = ctx.array<float>(field("loraA"), napi_float32_array, fn, "args.loraA", a.rank * groups, Access::In,
                                [&] { return product("rank*(in/g)", a.rank, groups); });
    a.lora_b = ctx.array<float>(field("loraB"), napi_float32_array, fn, "args.loraB", a.out * a.rank, Access::In,
                                [&] { return product("out*rank", a.out, a.rank); });
  }
  return a;
}

// node-addon-api turns only Napi::Error into a JS exception; any other C++ exception escaping a callback would
// terminate the process (a CUDA call without a driver, a failed allocation). Every callback goes through this.
template <Napi::Value (*F)(const Napi::CallbackInfo&)>
Napi::Value guarded(const Napi::CallbackInfo& info) {
  try {
    return F(info);
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Napi::Error::New(info.Env(), e.what());
  }
}

inline const Bound& bound_of(const Napi::CallbackInfo& info) { return *static_cast<const Bound*>(info.Data()); }

// Each wrapper reads its arguments through a CallContext (host arrays are staged on a GPU backend, device
// tensors used in place), calls the kernel and brings back what it staged.
struct KernelWrappers {
  static Napi::Value quantize(const Napi::CallbackInfo& info) {
    const Bound& b = bound_of(info);
    const KernelFns& k = *b.k;
    const char* fn = b.name.c_str();
    expect_argc(info, 6, fn);
    CallContext ctx(b.mem);
    const int64_t out = int_arg(info[1], fn, "out", 1), in = int_arg(info[2], fn, "in", 1);
    const int64_t groups = checked_groups(info.Env(), k, in, fn);
    auto per_group = [&] { return product("out*(in/g)", out, groups); };
    const float* w = ctx.array<float>(info[0], napi_float32_array, fn, "w", out * in, Access::In, "out*in");
    uint32_t* q = ctx.array<uint32_t>(info[3], napi_uint32_array, fn, "qweight", out * words_per_row(in, k.bits), Access::Out,
                                      "out*words_per_row(in, bits)");
    void* alpha = scales_arg(ctx, info[4], k, fn, "alpha", out * groups, Access::Out, per_group);
    void* beta = scales_arg(ctx, info[5], k, fn, "beta", out * groups, Access::Out, per_group);
    k.quantize(w, out, in, q, alpha, beta);
    ctx.finish();
    return info.Env().Undefined();
  }
  static Napi::Value dequantize(const Napi::CallbackInfo& info) {
    const Bound& b = bound_of(info);
    const KernelFns& k = *b.k;
    const char* fn = b.name.c_str();
    expect_argc(info, 6, fn);
    CallContext ctx(b.mem);
    const int64_t out = int_arg(info[3], fn, "out", 1), in = int_arg(info[4], fn, "in", 1);
    const int64_t groups = checked_groups(info.Env(), k, in, fn);
    auto per_group = [&] { return product("out*(in/g)", out, groups); };
    const uint32_t* q = ctx.array<uint32_t>(info[0], napi_uint32_array, fn, "qweight", out * words_per_row(in, k.bits), Access::In,
                                            "out*words_per_row(in, bits)");
    const void* alpha = scales_arg(ctx, info[1], k, fn, "alpha", out * groups, Access::In, per_group);
    const void* beta = scales_arg(ctx, info[2], k, fn, "beta", out * groups, Access::In, per_group);
    float* w = ctx.array<float>(info[5], napi_float32_array, fn, "w", out * in, Access::Out, "out*in");
    k.dequantize(q, alpha, beta, out, in, w);
    ctx.finish();
    return info.Env().Undefined();
  }
  static Napi::Value forward(const Napi::CallbackInfo& info) {
    const Bound& b = bound_of(info);
    const char* fn = b.name.c_str();
    expect_argc(info, 3, fn);
    CallContext ctx(b.mem);
    const LayerArgs a = layer_args(ctx, info[0], *b.k, fn);
    const void* x = activation(ctx, info[1], *b.k, fn, "x", a.m, a.in, "m*in", Access::In);
    void* y = activation(ctx, info[2], *b.k, fn, "y", a.m, a.out, "m*out", Access::Out);
    b.k->forward(a, x, y);
    ctx.finish();
    return info.Env().Undefined();
  }
  static Napi::Value backward(const Napi::CallbackInfo& info) {
    const Bound& b = bound_of(info);
    const char* fn = b.name.c_str();
    expect_argc(info, 6, fn);
    CallContext ctx(b.mem);
    const LayerArgs a = layer_args(ctx, info[0], *b.k, fn);
    const int64_t groups = a.in / b.k->group;
    const void* x = activation(ctx, info[1], *b.k, fn, "x", a.m, a.in, "m*in", Access::In);
    const void* dy = activation(ctx, info[2], *b.k, fn, "dy", a.m, a.out, "m*out", Access::In);
    void* dx = activation(ctx, info[3], *b.k, fn, "dx", a.m, a.in, "m*in", Access::Out);
    float* ga = ctx.array<float>(info[4], napi_float32_array, fn, "gradA", a.rank * groups, Access::Out, "rank*(in/g)");
    float* gb = ctx.array<float>(info[5], napi_float32_array, fn, "gradB", a.out * a.rank, Access::Out, "out*rank");
    b.k->backward(a, x, dy, dx, ga, gb);
    ctx.finish();
    return info.Env().Undefined();
  }
  static Napi::Value merge(const Napi::CallbackInfo& info) {
    const Bound& b = bound_of(info);
    const char* fn = b.name.c_str();
    expect_argc(info, 2, fn);
    CallContext ctx(b.mem);
    const LayerArgs a = layer_args(ctx, info[0], *b.k, fn);
    void* beta_out = scales_arg(ctx, info[1], *b.k, fn, "betaOut", a.out * (a.in / b.k->group), Access::Out, "out*(in/g)");
    b.k->merge(a, beta_out);
    ctx.finish();
    return info.Env().Undefined();
  }
};

// kernels[backend] = { [id]: { quantize, dequantize, forward, backward, merge, bits, group } }. The Bound
// records live as long as the process (an addon is never unloaded), hence the deliberate `new`.
inline Napi::Object backend_table(Napi::Env env, const char* backend, const KernelFns* table, size_t n, const DeviceMemory* mem) {
  static const char* names[5] = {"quantize", "dequantize", "forward", "backward", "merge"};
  static Napi::Value (*const ops[5])(const Napi::CallbackInfo&) = {
      guarded<KernelWrappers::quantize>, guarded<KernelWrappers::dequantize>, guarded<KernelWrappers::forward>,
      guarded<KernelWrappers::backward>, guarded<KernelWrappers::merge>};
  Napi::Object byId = Napi::Object::New(env);
  for (size_t i = 0; i < n; i++) {
    Napi::Object set = Napi::Object::New(env);
    for (int j = 0; j < 5; j++) {
      auto* bound = new Bound{&table[i], mem, std::string(backend) + "." + table[i].id + "." + names[j]};
      set.Set(names[j], Napi::Function::New(env, ops[j], names[j], bound));
    }
    set.Set("bits", Napi::Number::New(env, table[i].bits));
    set.Set("group", Napi::Number::New(env, (double)table[i].group));
    set.Set("scales", Napi::String::New(env, table[i].scales == Act::U16 ? "fp16" : "fp32"));
    byId.Set(table[i].id, set);
  }
  return byId;
}

}  // namespace qalora::addon

// Prototypes of one specialization's entry points in namespace qalora::<backend>::<id> (docs/ARCHITECTURE.md).
#define QL_DECLARE_KERNELS(BACKEND, ID) QL_DECLARE_LAYER_KERNELS(qalora::BACKEND::ID)

#define QL_KERNEL_ENTRY(BACKEND, ID, BITS, GROUP, ACT, SCALES)                                                \
  {#ID, BITS, GROUP, qalora::addon::Act::ACT, qalora::addon::Act::SCALES, &qalora::BACKEND::ID::quantize,     \
   &qalora::BACKEND::ID::dequantize,                                                                          \
   &qalora::BACKEND::ID::forward, &qalora::BACKEND::ID::backward, &qalora::BACKEND::ID::merge}
