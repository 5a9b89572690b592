# What every qalora CMake project shares: the addon's (CMakeLists.txt) and the spec-independent library's
# (shared/CMakeLists.txt, built once per content by compiler/build.ts and linked whole into each addon whose
# sources match). One file, so a prebuilt archive and the addon that links it are compiled alike.
set(CMAKE_CXX_STANDARD 17)
set(CMAKE_CXX_STANDARD_REQUIRED ON)
set(CMAKE_POSITION_INDEPENDENT_CODE ON)
if(NOT CMAKE_BUILD_TYPE)
  set(CMAKE_BUILD_TYPE Release)
endif()
set(CMAKE_CXX_FLAGS_RELEASE "-O3 -DNDEBUG")
# g++ makes the statics of inline functions STB_GNU_UNIQUE, and the dynamic linker unifies those across every
# loaded library, RTLD_LOCAL or not: two addons in one process would share one pool, one kernel table. Not here.
add_compile_options("$<$<COMPILE_LANGUAGE:CXX>:-fno-gnu-unique>" "$<$<COMPILE_LANGUAGE:CUDA>:SHELL:-Xcompiler -fno-gnu-unique>")
find_package(Threads REQUIRED)

set(QL_SRC ${CMAKE_CURRENT_SOURCE_DIR}/src)
set(QL_INCLUDES ${QL_SRC} ${QL_SRC}/common)

# The sources of TARGET whose path matches PATTERN get the compile options OPTIONS (a ;-list).
function(qalora_source_options target pattern options)
  get_target_property(sources ${target} SOURCES)
  foreach(f IN LISTS sources)
    if(f MATCHES "${pattern}")
      set_source_files_properties(${f} PROPERTIES COMPILE_OPTIONS "${options}")
    endif()
  endforeach()
endfunction()

# The *_avx2.cpp sources of TARGET are its AVX2/FMA/F16C builds, picked at run time (cpu/dispatch.h).
function(qalora_cpu_flags target)
  qalora_source_options(${target} "_avx2\\.cpp$" "-mavx2;-mfma;-mf16c")
endfunction()

# The CUDA emulation builds the .cu files with g++ against emu/ (QALORA_EMU). It needs the toolkit's headers
# (cuda_fp16.h, vector_types.h, …) but neither nvcc nor a GPU. find_path caches its result, so a later
# reconfigure (a changed source list) keeps the include directory.
macro(qalora_find_cuda_headers)
  find_package(CUDAToolkit QUIET)
  find_path(QALORA_CUDA_INCLUDE cuda_fp16.h HINTS ${CUDAToolkit_INCLUDE_DIRS} $ENV{CUDA_HOME}/include /usr/local/cuda/include)
endmacro()

# TARGET holds emulated CUDA: each addon/emu_*.cpp wrapper includes one .cu after cuda_emu.h, and every load and
# store of the kernels is checked against its type's alignment (a GPU faults on a misaligned vector access such
# as a uint4 read through a cast; a CPU forgives it): the process stops with the line.
function(qalora_emu_flags target)
  target_include_directories(${target} PRIVATE ${QL_INCLUDES} ${QALORA_CUDA_INCLUDE})
  target_compile_definitions(${target} PRIVATE QALORA_EMU)
  target_compile_options(${target} PRIVATE -Wno-unknown-pragmas)
  target_link_libraries(${target} PRIVATE Threads::Threads)
  qalora_source_options(${target} "/addon/emu_[^/]*\\.cpp$" "-include;${QL_SRC}/emu/cuda_emu.h;-fsanitize=alignment;-fno-sanitize-recover=alignment")
endfunction()

# The spec-independent SOURCES go into TARGET, unless compiler/build.ts passed the archive it built from the
# same sources (the cache variable named by VAR): then that archive is linked whole into ADDON, as if its
# objects were the addon's own. A plain cmake-js build of the folder compiles them here.
function(qalora_shared_sources var addon target)
  if(${var})
    target_link_libraries(${addon} PRIVATE "-Wl,--whole-archive,${${var}},--no-whole-archive")
    set_property(TARGET ${addon} APPEND PROPERTY LINK_DEPENDS ${${var}})
  else()
    target_sources(${target} PRIVATE ${ARGN})
  endif()
endfunction()
