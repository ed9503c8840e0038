// Metal prelude: what the shared kernel bodies' portable names mean on Apple GPUs.
// Above the prologue marker: header (helpers, macros). Below it: lines prepended to each kernel body; they
// name MLX's thread attributes so that mx.fast.metal_kernel adds them to the generated signature.
#include <metal_stdlib>
using namespace metal;
#define DEVICE device
#define THREAD thread
#define DEVICE_FN inline
#define AS_FLOAT(u) as_type<float>(u)
#define SIMD_SUM(v) simd_sum(v)
#define SIMD_MAX(v) simd_max(v)
#define SIMD_SHUFFLE(v, lane) simd_shuffle(v, lane)
#define SHARED(type, name, n) threadgroup type name[n]
#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define EXP(v) metal::exp(v)
// ---- prologue ----
const uint32_t LANE = thread_index_in_simdgroup;
const uint32_t SIMD_IN_TG = simdgroup_index_in_threadgroup;
const uint32_t TG = threadgroup_position_in_grid.x;
const uint32_t TG_THREADS = threads_per_threadgroup.x;
