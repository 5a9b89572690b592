// Reading N-API arguments with messages that name the function, the argument and what was expected: these
// messages are what a user sees when a call from JS is wrong.
#pragma once
#define NAPI_VERSION 8
#include <napi.h>

#include <cmath>
#include <cstdint>
#include <string>

namespace qalora::addon {

constexpr int64_t kAnyLength = -1;

inline const char* typed_array_name(napi_typedarray_type t) {
  switch (t) {
    case napi_int8_array: return "Int8Array";
    case napi_uint8_array: return "Uint8Array";
    case napi_uint8_clamped_array: return "Uint8ClampedArray";
    case napi_int16_array: return "Int16Array";
    case napi_uint16_array: return "Uint16Array";
    case napi_int32_array: return "Int32Array";
    case napi_uint32_array: return "Uint32Array";
    case napi_float32_array: return "Float32Array";
    case napi_float64_array: return "Float64Array";
    case napi_bigint64_array: return "BigInt64Array";
    case napi_biguint64_array: return "BigUint64Array";
    default: return "TypedArray";
  }
}

[[noreturn]] inline void type_error(Napi::Env env, const std::string& msg) { throw Napi::TypeError::New(env, msg); }
[[noreturn]] inline void range_error(Napi::Env env, const std::string& msg) { throw Napi::RangeError::New(env, msg); }

inline std::string describe(const Napi::Value& v) {
  if (v.IsTypedArray()) {
    auto a = v.As<Napi::TypedArray>();
    return std::string(typed_array_name(a.TypedArrayType())) + " of length " + std::to_string(a.ElementLength());
  }
  if (v.IsUndefined()) return "undefined";
  if (v.IsNull()) return "null";
  if (v.IsNumber()) return "number";
  if (v.IsBoolean()) return "boolean";
  if (v.IsString()) return "string";
  if (v.IsArray()) return "Array";
  return "object";
}

// `why` says where an expected length comes from (e.g. "m*in = 3*64"), so a mismatch is easy to trace. It is
// a callable (or a string literal), evaluated only when the check fails: the happy path allocates nothing.
inline std::string explain(const char* why) { return why; }
template <typename F>
std::string explain(const F& why) { return why(); }

template <typename T, typename Why = const char*>
T* typed_array(const Napi::Value& v, napi_typedarray_type type, const char* fn, const char* arg, int64_t len, Why why = "") {
  bool ok = v.IsTypedArray() && v.As<Napi::TypedArray>().TypedArrayType() == type;
  if (ok && len != kAnyLength && (int64_t)v.As<Napi::TypedArray>().ElementLength() != len) ok = false;
  if (!ok) {
    std::string want = typed_array_name(type);
    const std::string because = explain(why);
    if (len != kAnyLength) want += " of length " + std::to_string(len) + (because.empty() ? "" : " (" + because + ")");
    type_error(v.Env(), std::string(fn) + ": argument '" + arg + "' must be a " + want + ", got " + describe(v));
  }
  auto a = v.As<Napi::TypedArray>();
  return reinterpret_cast<T*>(static_cast<uint8_t*>(a.ArrayBuffer().Data()) + a.ByteOffset());
}

inline std::string product(const char* dims, int64_t a, int64_t b) {
  return std::string(dims) + " = " + std::to_string(a) + "*" + std::to_string(b);
}

inline double number_arg(const Napi::Value& v, const char* fn, const char* arg) {
  if (!v.IsNumber()) type_error(v.Env(), std::string(fn) + ": argument '" + arg + "' must be a number, got " + describe(v));
  return v.As<Napi::Number>().DoubleValue();
}

inline int64_t int_arg(const Napi::Value& v, const char* fn, const char* arg, int64_t min = 0) {
  const double d = number_arg(v, fn, arg);
  if (!(d == std::floor(d)) || d < (double)min || d > 9007199254740991.0)
    range_error(v.Env(), std::string(fn) + ": argument '" + arg + "' must be an integer >= " + std::to_string(min) +
                             ", got " + std::to_string(d));
  return (int64_t)d;
}

inline uint64_t u64_arg(const Napi::Value& v, const char* fn, const char* arg) {
  if (v.IsBigInt()) {
    bool lossless = true;
    const uint64_t u = v.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) range_error(v.Env(), std::string(fn) + ": argument '" + arg + "' does not fit in 64 unsigned bits");
    return u;
  }
  return (uint64_t)int_arg(v, fn, arg);
}

inline bool bool_arg(const Napi::Value& v, const char* fn, const char* arg) {
  if (v.IsBoolean()) return v.As<Napi::Boolean>().Value();
  if (v.IsNumber()) return v.As<Napi::Number>().DoubleValue() != 0;
  type_error(v.Env(), std::string(fn) + ": argument '" + arg + "' must be a boolean, got " + describe(v));
}

inline void expect_argc(const Napi::CallbackInfo& info, size_t n, const char* fn) {
  if (info.Length() != n)
    type_error(info.Env(), std::string(fn) + ": expected " + std::to_string(n) + " arguments, got " + std::to_string(info.Length()));
}

}  // namespace qalora::addon
