// The MPI calls data-parallel training needs, as a small N-API addon (its TypeScript side, and the one
// declaration of this API, is runtime/mpi.ts). Collectives run on MPI_COMM_WORLD with MPI_ERRORS_ARE_FATAL, so
// a failed call ends the job instead of returning; a watchdog thread ends this rank when a collective makes no
// progress for longer than the timeout (a peer that hangs rather than dies), and mpirun then ends the others.
#include <napi.h>
#include <mpi.h>

#include <dlfcn.h>
#include <link.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

bool initialized = false;
int world_rank = 0, world_size = 1;
std::string reopened;

// ---- watchdog ---------------------------------------------------------------------------------------------
std::atomic<int64_t> entered_ms{0};  // when the collective in progress began; 0 when none is
std::atomic<const char*> entered_what{""};
std::atomic<int64_t> timeout_ms{0};

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct InCollective {
  explicit InCollective(const char* what) {
    entered_what = what;
    entered_ms = now_ms();
  }
  ~InCollective() { entered_ms = 0; }
};

void watchdog() {
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    const int64_t t = entered_ms.load(), limit = timeout_ms.load();
    if (t != 0 && limit > 0 && now_ms() - t > limit) {
      // Not MPI_Abort: this thread may not call MPI. A non-zero exit makes mpirun end every other rank.
      std::fprintf(stderr,
                   "qalora: rank %d of %d: no progress in %s for %lld s (another rank is hung or unreachable); "
                   "exiting so that mpirun ends the job (QALORA_MPI_TIMEOUT sets the limit)\n",
                   world_rank, world_size, entered_what.load(), (long long)(limit / 1000));
      std::fflush(stderr);
      _exit(75);
    }
  }
}

// ---- init -------------------------------------------------------------------------------------------------
// Open MPI loads its components (mca_*.so) with dlopen, and they resolve symbols of libmpi / libopen-pal /
// libopen-rte that must be globally visible. Node loads this addon RTLD_LOCAL, so those libraries came in
// local too: re-open each one that is already loaded with RTLD_GLOBAL before MPI_Init (mpi4py does the same).
int promote(struct dl_phdr_info* info, size_t, void*) {
  const char* path = info->dlpi_name;
  if (!path || !*path) return 0;
  const char* base = std::strrchr(path, '/');
  base = base ? base + 1 : path;
  for (const char* prefix : {"libmpi.", "libmpich.", "libopen-pal.", "libopen-rte.", "libpmix.", "libpmi."}) {
    if (std::strncmp(base, prefix, std::strlen(prefix)) == 0 && dlopen(path, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD)) {
      if (!reopened.empty()) reopened += ' ';
      reopened += base;
    }
  }
  return 0;
}

Napi::Value Init(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() > 0 && info[0].IsNumber()) timeout_ms = (int64_t)(info[0].As<Napi::Number>().DoubleValue() * 1000);
  if (!initialized) {
    dl_iterate_phdr(promote, nullptr);
    int provided = 0;
    if (MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
      throw Napi::Error::New(env, "MPI_Init_thread failed");
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL);
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    std::thread(watchdog).detach();
    initialized = true;
  }
  char name[MPI_MAX_PROCESSOR_NAME] = {0};
  int len = 0;
  MPI_Get_processor_name(name, &len);
  char version[MPI_MAX_LIBRARY_VERSION_STRING] = {0};
  int vlen = 0;
  MPI_Get_library_version(version, &vlen);
  Napi::Object o = Napi::Object::New(env);
  o.Set("rank", world_rank);
  o.Set("size", world_size);
  o.Set("host", std::string(name, len));
  o.Set("library", std::string(version, strnlen(version, (size_t)vlen)));
  o.Set("reopened", reopened);
  return o;
}

void require_init(Napi::Env env, const char* fn) {
  if (!initialized) throw Napi::Error::New(env, std::string("mpi.") + fn + ": call init() first");
}

// ---- collectives ------------------------------------------------------------------------------------------
// Bounded pieces: MPI counts are int, and the root's gather buffer is size × chunk.
constexpr size_t kChunk = size_t(1) << 20;

// Sum over ranks in rank order (rank 0 + rank 1 + …, in double), identical for every run with the same N:
// gather to rank 0, add there, broadcast. MPI_Allreduce may pick its reduction tree (and so the rounding) by
// message size and N. The adapters' gradients are small, so the extra hop costs little.
template <typename T>
void ordered_sum(T* data, size_t n, MPI_Datatype type) {
  std::vector<T> gathered(world_rank == 0 ? kChunk * world_size : 0);
  for (size_t off = 0; off < n; off += kChunk) {
    const int len = (int)std::min(kChunk, n - off);
    MPI_Gather(data + off, len, type, gathered.data(), len, type, 0, MPI_COMM_WORLD);
    if (world_rank == 0) {
      for (int i = 0; i < len; i++) {
        double s = gathered[i];
        for (int r = 1; r < world_size; r++) s += gathered[(size_t)r * len + i];
        data[off + i] = (T)s;
      }
    }
    MPI_Bcast(data + off, len, type, 0, MPI_COMM_WORLD);
  }
}

Napi::Value AllreduceSum(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  require_init(env, "allreduceSum");
  if (info.Length() < 1 || !info[0].IsTypedArray()) throw Napi::TypeError::New(env, "mpi.allreduceSum(buf): buf must be a Float32Array or Float64Array");
  Napi::TypedArray t = info[0].As<Napi::TypedArray>();
  InCollective guard("allreduceSum");
  if (t.TypedArrayType() == napi_float32_array) {
    Napi::Float32Array a = t.As<Napi::Float32Array>();
    ordered_sum(a.Data(), a.ElementLength(), MPI_FLOAT);
  } else if (t.TypedArrayType() == napi_float64_array) {
    Napi::Float64Array a = t.As<Napi::Float64Array>();
    ordered_sum(a.Data(), a.ElementLength(), MPI_DOUBLE);
  } else {
    throw Napi::TypeError::New(env, "mpi.allreduceSum(buf): buf must be a Float32Array or Float64Array");
  }
  return env.Undefined();
}

Napi::Value Broadcast(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  require_init(env, "broadcast");
  if (info.Length() < 2 || !info[0].IsTypedArray() || !info[1].IsNumber()) throw Napi::TypeError::New(env, "mpi.broadcast(buf, root): buf must be a typed array, root a rank");
  Napi::TypedArray t = info[0].As<Napi::TypedArray>();
  const int root = info[1].As<Napi::Number>().Int32Value();
  if (root < 0 || root >= world_size) throw Napi::RangeError::New(env, "mpi.broadcast: root " + std::to_string(root) + " is not a rank (size " + std::to_string(world_size) + ")");
  uint8_t* bytes = static_cast<uint8_t*>(t.ArrayBuffer().Data()) + t.ByteOffset();
  const size_t n = t.ByteLength();
  InCollective guard("broadcast");
  for (size_t off = 0; off < n; off += size_t(1) << 30) MPI_Bcast(bytes + off, (int)std::min(size_t(1) << 30, n - off), MPI_BYTE, root, MPI_COMM_WORLD);
  return env.Undefined();
}

Napi::Value Barrier(const Napi::CallbackInfo& info) {
  require_init(info.Env(), "barrier");
  InCollective guard("barrier");
  MPI_Barrier(MPI_COMM_WORLD);
  return info.Env().Undefined();
}

Napi::Value Abort(const Napi::CallbackInfo& info) {
  const int code = info.Length() > 0 && info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : 1;
  std::fflush(stderr);
  if (initialized) MPI_Abort(MPI_COMM_WORLD, code);
  _exit(code);
}

Napi::Value Finalize(const Napi::CallbackInfo& info) {
  if (initialized) {
    {
      InCollective guard("finalize");
      MPI_Finalize();
    }
    initialized = false;
  }
  return info.Env().Undefined();
}

Napi::Object Register(Napi::Env env, Napi::Object exports) {
  exports.Set("init", Napi::Function::New(env, Init, "init"));
  exports.Set("allreduceSum", Napi::Function::New(env, AllreduceSum, "allreduceSum"));
  exports.Set("broadcast", Napi::Function::New(env, Broadcast, "broadcast"));
  exports.Set("barrier", Napi::Function::New(env, Barrier, "barrier"));
  exports.Set("abort", Napi::Function::New(env, Abort, "abort"));
  exports.Set("finalize", Napi::Function::New(env, Finalize, "finalize"));
  return exports;
}

}  // namespace

NODE_API_MODULE(qalora_mpi, Register)
