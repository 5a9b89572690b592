// The CUDA backend run on the CPU: the generated kernels, compiled by g++ against the emulator (cuda_emu.h),
// in namespace qalora::emu (QL_BACKEND_NS). When the build generates its own per-.cu wrapper
// (src/addon/emu_kernels_cu.cpp, compiled with -include cuda_emu.h), that wrapper is the one copy: compiling
// kernels.cu twice would define every entry point twice.
#if !__has_include("../addon/emu_kernels_cu.cpp")
#include "cuda_emu.h"
#include "../cuda/kernels.cu"
#endif
