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
#define FMA(a, b, c) metal::fma(a, b, c)
#define UNROLL _Pragma("unroll")
#define FLOAT4(a, b, c, d) float4(a, b, c, d)
#define SIMD_BARRIER() simdgroup_barrier(mem_flags::mem_threadgroup)
inline void flashmoe_load4(const device uint32_t* s, thread uint32_t* d) {
  const uint4 v = *reinterpret_cast<const device uint4*>(s);
  d[0] = v.x; d[1] = v.y; d[2] = v.z; d[3] = v.w;
}
inline void flashmoe_load2(const device uint32_t* s, thread uint32_t* d) {
  const uint2 v = *reinterpret_cast<const device uint2*>(s);
  d[0] = v.x; d[1] = v.y;
}
inline uint32_t flashmoe_mask_or(uint32_t v, uint32_t mask, uint32_t bits) { return (v & mask) | bits; }
// ---- prologue ----
const uint32_t LANE = thread_index_in_simdgroup;
const uint32_t SIMD_IN_TG = simdgroup_index_in_threadgroup;
const uint32_t TG = threadgroup_position_in_grid.x;
const uint32_t TG_THREADS = threads_per_threadgroup.x;
