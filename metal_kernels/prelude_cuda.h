// CUDA prelude: the same kernel bodies as CUDA twins (mx.fast.cuda_kernel). A SIMD-group is a warp of 32.
// Above the prologue marker: header. Below it: lines prepended to each kernel body.
#define DEVICE
#define THREAD
#define DEVICE_FN __device__ inline
#define AS_FLOAT(u) __uint_as_float(u)
#define SIMD_SUM(v) flashmoe_warp_sum(v)
#define SIMD_MAX(v) flashmoe_warp_max(v)
#define SIMD_SHUFFLE(v, lane) __shfl_sync(0xffffffffu, v, lane)
#define SHARED(type, name, n) __shared__ type name[n]
#define BARRIER() __syncthreads()
#define EXP(v) expf(v)
#define FMA(a, b, c) fmaf(a, b, c)
#define UNROLL _Pragma("unroll")
#define FLOAT4(a, b, c, d) make_float4(a, b, c, d)
#define SIMD_BARRIER() __syncwarp()
__device__ inline void flashmoe_load4(const uint32_t* s, uint32_t* d) {
  const uint4 v = *reinterpret_cast<const uint4*>(s);
  d[0] = v.x; d[1] = v.y; d[2] = v.z; d[3] = v.w;
}
__device__ inline void flashmoe_load2(const uint32_t* s, uint32_t* d) {
  const uint2 v = *reinterpret_cast<const uint2*>(s);
  d[0] = v.x; d[1] = v.y;
}
__device__ inline float flashmoe_warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
__device__ inline float flashmoe_warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
// ---- prologue ----
const uint32_t LANE = threadIdx.x % 32;
const uint32_t SIMD_IN_TG = threadIdx.x / 32;
const uint32_t TG = blockIdx.x;
const uint32_t TG_THREADS = blockDim.x;
