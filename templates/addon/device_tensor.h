// Backend-owned tensors and the staging of host arrays. A DeviceTensor is a JS handle on a block of a GPU
// backend's memory (cuda or emu), taken from that backend's pool and given back when the last handle on it is
// released or collected. Every array argument of a GPU entry point may be one (used in place: no copy, no
// wait) or a host typed array (staged: uploaded before the call, downloaded after it if the call writes it).
#pragma once
#include <memory>
#include <vector>

#include "device_memory.h"
#include "napi_args.h"

namespace qalora::addon {

enum class DType { F32, U16, U32, I32, U8 };

inline size_t dtype_bytes(DType t) { return t == DType::U16 ? 2 : t == DType::U8 ? 1 : 4; }
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::U16: return "u16";
    case DType::U32: return "u32";
    case DType::I32: return "i32";
    default: return "u8";
  }
}
inline bool dtype_of(napi_typedarray_type t, DType* out) {
  switch (t) {
    case napi_float32_array: *out = DType::F32; return true;
    case napi_uint16_array: *out = DType::U16; return true;
    case napi_uint32_array: *out = DType::U32; return true;
    case napi_int32_array: *out = DType::I32; return true;
    case napi_uint8_array: *out = DType::U8; return true;
    default: return false;
  }
}

struct Allocation {
  const DeviceMemory* mem;
  void* ptr;
  size_t bytes;
  Allocation(const DeviceMemory* m, size_t b) : mem(m), ptr(m->alloc(b)), bytes(b) {}
  ~Allocation() { mem->release(ptr, bytes); }
  Allocation(const Allocation&) = delete;
  Allocation& operator=(const Allocation&) = delete;
};

// The constructor of DeviceTensor, kept per environment (one per worker thread that loads the addon).
struct AddonData {
  Napi::FunctionReference tensor_class;
};

class DeviceTensor : public Napi::ObjectWrap<DeviceTensor> {
 public:
  // What New() hands the JS constructor through an External: only the addon creates tensors.
  struct Init {
    std::shared_ptr<Allocation> alloc;
    int64_t offset, length;
    DType dtype;
  };

  static Napi::Function define(Napi::Env env) {
    return DefineClass(env, "DeviceTensor",
                       {InstanceAccessor<&DeviceTensor::get_length>("length"),
                        InstanceAccessor<&DeviceTensor::get_dtype>("dtype"),
                        InstanceAccessor<&DeviceTensor::get_backend>("backend"),
                        InstanceAccessor<&DeviceTensor::get_byte_length>("byteLength"),
                        InstanceMethod<&DeviceTensor::view>("view"),
                        InstanceMethod<&DeviceTensor::upload>("upload"),
                        InstanceMethod<&DeviceTensor::download>("download"),
                        InstanceMethod<&DeviceTensor::copy_from>("copyFrom"),
                        InstanceMethod<&DeviceTensor::release>("release")});
  }

  static Napi::Object make(Napi::Env env, Init init) {
    Napi::FunctionReference& cls = env.GetInstanceData<AddonData>()->tensor_class;
    return cls.New({Napi::External<Init>::New(env, &init)});
  }

  // The tensor behind v, or nullptr when v is not one.
  static DeviceTensor* of(const Napi::Value& v) {
    if (!v.IsObject() || v.IsTypedArray()) return nullptr;
    AddonData* data = v.Env().GetInstanceData<AddonData>();
    if (!data || !v.As<Napi::Object>().InstanceOf(data->tensor_class.Value())) return nullptr;
    return Unwrap(v.As<Napi::Object>());
  }

  explicit DeviceTensor(const Napi::CallbackInfo& info) : Napi::ObjectWrap<DeviceTensor>(info) {
    if (info.Length() != 1 || !info[0].IsExternal())
      throw Napi::TypeError::New(info.Env(), "DeviceTensor: tensors are made by addon.device.<backend>.alloc(dtype, length)");
    const Init& init = *info[0].As<Napi::External<Init>>().Data();
    alloc_ = init.alloc;
    offset_ = init.offset;
    length_ = init.length;
    dtype_ = init.dtype;
  }

  DType dtype() const { return dtype_; }
  int64_t length() const { return length_; }
  const DeviceMemory* memory() const { return alloc_ ? alloc_->mem : nullptr; }
  void* raw() const { return static_cast<uint8_t*>(alloc_->ptr) + offset_ * dtype_bytes(dtype_); }
  std::string describe() const {
    return std::string("DeviceTensor(") + (alloc_ ? alloc_->mem->backend : "released") + ", " + dtype_name(dtype_) +
           ", length " + std::to_string(length_) + ")";
  }

 private:
  Napi::Value get_length(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), (double)length_); }
  Napi::Value get_dtype(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), dtype_name(dtype_)); }
  Napi::Value get_backend(const Napi::CallbackInfo& info) {
    return Napi::String::New(info.Env(), alloc_ ? alloc_->mem->backend : "released");
  }
  Napi::Value get_byte_length(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), (double)(length_ * (int64_t)dtype_bytes(dtype_)));
  }

  // [offset, offset + length) of this tensor, sharing its memory.
  Napi::Value view(const Napi::CallbackInfo& info);
  // src (a typed array of this dtype) into [offset, offset + src.length): queued, src may be reused at once.
  Napi::Value upload(const Napi::CallbackInfo& info);
  // [offset, offset + dst.length) into dst: waits for the stream.
  Napi::Value download(const Napi::CallbackInfo& info);
  // src (a tensor of this backend and dtype) into [offset, offset + src.length): queued.
  Napi::Value copy_from(const Napi::CallbackInfo& info);
  // The typed array argument of upload/download (info[0], offset info[1]), checked against this tensor.
  struct HostSpan {
    uint8_t* host;
    uint8_t* device;
    size_t bytes;
  };
  HostSpan host_span(const Napi::CallbackInfo& info, const char* fn, const char* arg) const;
  // This handle lets go of the memory; the block goes back to the pool once no view holds it.
  Napi::Value release(const Napi::CallbackInfo& info) {
    alloc_.reset();
    return info.Env().Undefined();
  }

  std::shared_ptr<Allocation> alloc_;
  int64_t offset_ = 0, length_ = 0;
  DType dtype_ = DType::F32;
};

// How an entry point uses an array argument: what staging must upload (In, InOut) and download (Out, InOut).
enum class Access { In, Out, InOut };

// The arrays of one native call on one backend. On the CPU (mem == nullptr) arguments are host typed arrays.
// On a GPU backend a DeviceTensor is passed through and a typed array is staged through the pool; finish()
// brings the staged outputs back, which is the only place such a call waits.
class CallContext {
 public:
  explicit CallContext(const DeviceMemory* mem) : mem_(mem) {}
  ~CallContext() {
    for (const Staged& s : staged_) mem_->release(s.dev, s.bytes);
  }
  CallContext(const CallContext&) = delete;
  CallContext& operator=(const CallContext&) = delete;

  template <typename T, typename Why = const char*>
  T* array(const Napi::Value& v, napi_typedarray_type type, const char* fn, const char* arg, int64_t len, Access access,
           Why why = "") {
    if (DeviceTensor* t = DeviceTensor::of(v)) return static_cast<T*>(device_array(*t, type, fn, arg, len, explain(why)));
    T* host = typed_array<T>(v, type, fn, arg, len, why);
    if (!mem_) return host;
    const size_t bytes = (size_t)v.As<Napi::TypedArray>().ByteLength();
    void* dev = mem_->alloc(bytes);
    staged_.push_back({host, dev, bytes, access != Access::In});
    if (access != Access::Out) mem_->upload(dev, host, bytes);
    return static_cast<T*>(dev);
  }

  void finish() {
    for (const Staged& s : staged_)
      if (s.out) mem_->download(s.host, s.dev, s.bytes);
  }

 private:
  void* device_array(const DeviceTensor& t, napi_typedarray_type type, const char* fn, const char* arg, int64_t len,
                     const std::string& why) {
    DType want = DType::F32;
    dtype_of(type, &want);
    const std::string where = std::string(fn) + ": argument '" + arg + "' ";
    if (!t.memory()) throw std::invalid_argument(where + "is a released DeviceTensor");
    if (!mem_)
      throw std::invalid_argument(where + "is a " + t.describe() + ", but the cpu kernels take host arrays (" +
                                  typed_array_name(type) + ")");
    if (t.memory() != mem_)
      throw std::invalid_argument(where + "is a " + t.describe() + ", but this is a " + mem_->backend + " entry point");
    if (t.dtype() != want || (len != kAnyLength && t.length() != len))
      throw std::invalid_argument(where + "must be " + dtype_name(want) +
                                  (len != kAnyLength ? " of length " + std::to_string(len) + (why.empty() ? "" : " (" + why + ")") : "") +
                                  ", got a " + t.describe());
    return t.raw();
  }

  struct Staged {
    void* host;
    void* dev;
    size_t bytes;
    bool out;
  };
  const DeviceMemory* mem_;
  std::vector<Staged> staged_;
};

inline int64_t tensor_offset(const Napi::Value& v, const char* fn, int64_t length) {
  const int64_t off = v.IsUndefined() ? 0 : int_arg(v, fn, "offset");
  if (off > length) range_error(v.Env(), std::string(fn) + ": offset " + std::to_string(off) + " is past the tensor's length " + std::to_string(length));
  return off;
}

inline Napi::Value DeviceTensor::view(const Napi::CallbackInfo& info) {
  static const char* fn = "DeviceTensor.view";
  const int64_t off = tensor_offset(info[0], fn, length_);
  const int64_t len = info[1].IsUndefined() ? length_ - off : int_arg(info[1], fn, "length");
  if (off + len > length_)
    range_error(info.Env(), std::string(fn) + ": [" + std::to_string(off) + ", " + std::to_string(off + len) +
                                ") is outside the tensor's " + std::to_string(length_) + " elements");
  if (!alloc_) type_error(info.Env(), std::string(fn) + ": the tensor was released");
  return make(info.Env(), Init{alloc_, offset_ + off, len, dtype_});
}

inline DeviceTensor::HostSpan DeviceTensor::host_span(const Napi::CallbackInfo& info, const char* fn, const char* arg) const {
  DType t;
  if (!info[0].IsTypedArray() || !dtype_of(info[0].As<Napi::TypedArray>().TypedArrayType(), &t) || t != dtype_)
    type_error(info.Env(), std::string(fn) + ": '" + arg + "' must be a typed array of " + dtype_name(dtype_) + ", got " + qalora::addon::describe(info[0]));
  auto a = info[0].As<Napi::TypedArray>();
  const int64_t off = tensor_offset(info[1], fn, length_);
  if (off + (int64_t)a.ElementLength() > length_)
    range_error(info.Env(), std::string(fn) + ": " + std::to_string(a.ElementLength()) + " elements at offset " + std::to_string(off) +
                                " do not fit the tensor's " + std::to_string(length_));
  if (!alloc_) type_error(info.Env(), std::string(fn) + ": the tensor was released");
  return {static_cast<uint8_t*>(a.ArrayBuffer().Data()) + a.ByteOffset(), static_cast<uint8_t*>(raw()) + off * dtype_bytes(dtype_),
          a.ByteLength()};
}

inline Napi::Value DeviceTensor::upload(const Napi::CallbackInfo& info) {
  const HostSpan s = host_span(info, "DeviceTensor.upload", "src");
  alloc_->mem->upload(s.device, s.host, s.bytes);
  return info.Env().Undefined();
}

inline Napi::Value DeviceTensor::download(const Napi::CallbackInfo& info) {
  const HostSpan s = host_span(info, "DeviceTensor.download", "dst");
  alloc_->mem->download(s.host, s.device, s.bytes);
  return info[0];
}

inline Napi::Value DeviceTensor::copy_from(const Napi::CallbackInfo& info) {
  static const char* fn = "DeviceTensor.copyFrom";
  DeviceTensor* src = of(info[0]);
  if (!src || !src->alloc_ || !alloc_ || src->alloc_->mem != alloc_->mem || src->dtype_ != dtype_)
    type_error(info.Env(), std::string(fn) + ": 'src' must be a live DeviceTensor of " + (alloc_ ? alloc_->mem->backend : "?") + " and " +
                               dtype_name(dtype_) + ", got " + (src ? src->describe() : qalora::addon::describe(info[0])));
  const int64_t off = tensor_offset(info[1], fn, length_);
  if (off + src->length_ > length_)
    range_error(info.Env(), std::string(fn) + ": " + std::to_string(src->length_) + " elements at offset " + std::to_string(off) +
                                " do not fit the tensor's " + std::to_string(length_));
  alloc_->mem->copy(static_cast<uint8_t*>(raw()) + off * dtype_bytes(dtype_), src->raw(), src->length_ * dtype_bytes(dtype_));
  return info.Env().Undefined();
}

// addon.device.<backend>: alloc(dtype, length), sync(), trim(), stats().
inline Napi::Object device_api(Napi::Env env, const DeviceMemory* mem) {
  Napi::Object api = Napi::Object::New(env);
  api.Set("alloc", Napi::Function::New(env, [mem](const Napi::CallbackInfo& info) -> Napi::Value {
    const std::string fn = std::string("device.") + mem->backend + ".alloc";
    expect_argc(info, 2, fn.c_str());
    const std::string name = info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "";
    DType t;
    if (name == "f32") t = DType::F32;
    else if (name == "u16") t = DType::U16;
    else if (name == "u32") t = DType::U32;
    else if (name == "i32") t = DType::I32;
    else if (name == "u8") t = DType::U8;
    else type_error(info.Env(), fn + ": dtype must be one of f32 u16 u32 i32 u8, got " + qalora::addon::describe(info[0]));
    const int64_t n = int_arg(info[1], fn.c_str(), "length");
    try {
      return DeviceTensor::make(info.Env(), DeviceTensor::Init{std::make_shared<Allocation>(mem, (size_t)n * dtype_bytes(t)), 0, n, t});
    } catch (const std::exception& e) {
      throw Napi::Error::New(info.Env(), e.what());
    }
  }, "alloc"));
  api.Set("sync", Napi::Function::New(env, [mem](const Napi::CallbackInfo& info) -> Napi::Value {
    try {
      mem->sync();
    } catch (const std::exception& e) {
      throw Napi::Error::New(info.Env(), e.what());
    }
    return info.Env().Undefined();
  }, "sync"));
  api.Set("trim", Napi::Function::New(env, [mem](const Napi::CallbackInfo& info) -> Napi::Value {
    mem->trim();
    return info.Env().Undefined();
  }, "trim"));
  api.Set("stats", Napi::Function::New(env, [mem](const Napi::CallbackInfo& info) -> Napi::Value {
    const PoolStats s = mem->stats();
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("liveBytes", Napi::Number::New(info.Env(), (double)s.live_bytes));
    o.Set("cachedBytes", Napi::Number::New(info.Env(), (double)s.cached_bytes));
    o.Set("peakBytes", Napi::Number::New(info.Env(), (double)s.peak_bytes));
    o.Set("deviceAllocs", Napi::Number::New(info.Env(), (double)s.device_allocs));
    return o;
  }, "stats"));
  return api;
}

}  // namespace qalora::addon
