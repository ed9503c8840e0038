// CUDA prelude: the same kernel bodies as CUDA twins (mx.fast.cuda_kernel). A SIMD-group is a warp of 32.
// Above the prologue marker: header. Below it: lines prepended to each kernel body.
#define DEVICE
#define THREAD
#define DEVICE_FN __device__ inline
#define AS_FLOAT(u) __uint_as_float(u)
#define SIMD_SUM(v) flashmoe_warp_sum(v)
#define SIMD_MAX(v) flashmoe_warp_max(v)
#define SIMD_SHUFFLE(v, lane) __shfl_sync(0xffffffffu, v, lane)
#define SIMD_ANY(p) __any_sync(0xffffffffu, p)
#define SHARED(type, name, n) __shared__ type name[n]
#define BARRIER() __syncthreads()
#define EXP(v) expf(v)
#define EXP2(v) flashmoe_exp2(v)
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
// (v & mask) | bits in one LOP3; written plainly, two immediates make it an AND and an OR (the scalar bodies'
// unpacking: 4 -> 3 instructions per weight).
__device__ inline uint32_t flashmoe_mask_or(uint32_t v, uint32_t mask, uint32_t bits) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(v), "r"(mask), "r"(bits));
  return r;
}
// Tensor-core helpers (bodies that use them are CUDA-only; prelude_cpu.h emulates them for the tests).
#define BF16_BITS(v) __bfloat16_as_ushort(v)
__device__ inline float flashmoe_bf16_float(uint32_t bits16) { return __uint_as_float((bits16 & 0xFFFFu) << 16); }
// d += A B for one m16n8k16 tile: A 16x16 and B 16x8 in bfloat16 pairs, PTX's fragment layout; f32 accumulation.
__device__ inline void flashmoe_mma_bf16(float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// The nibbles at bits 0 and 16 of v as the bfloat16 pair 128 + q: (v & 0x000F000F) | 0x43004300 in one LOP3
// (left to the compiler, two immediates make it an AND and an OR).
__device__ inline uint32_t flashmoe_nibble_pair(uint32_t v) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(v), "r"(0x000F000Fu), "r"(0x43004300u));
  return r;
}
// The 32 bits of hi:lo (64 bits) from bit s (< 32) up, one SHF: a field that straddles two words in one instruction.
__device__ inline uint32_t flashmoe_funnel_shift(uint32_t lo, uint32_t hi, uint32_t s) { return __funnelshift_r(lo, hi, s); }
// Both bfloat16 halves of v minus 128 (exact for the 128 + q this is used on).
__device__ inline uint32_t flashmoe_bf16x2_minus_128(uint32_t v) {
  uint32_t r;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(0x3F803F80u), "r"(0xC300C300u));
  return r;
}
// Bytes of a (0-3) and b (4-7) picked by the selector's nibbles, as PTX's prmt.
__device__ inline uint32_t flashmoe_byte_perm(uint32_t a, uint32_t b, uint32_t selector) { return __byte_perm(a, b, selector); }
// Two floats as a bfloat16 pair (lo in the low half), each rounded to nearest even.
__device__ inline uint32_t flashmoe_bf16x2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
// Asynchronous copies global -> shared (cp.async) of WORDS (1, 2 or 4) words, both ends that aligned; committed
// as a group, and waited on until at most N groups are in flight. 16 bytes bypass L1 (.cg), as only they may.
template <int WORDS>
__device__ inline void flashmoe_copy_async(uint32_t* shared, const uint32_t* global) {
  const uint32_t to = uint32_t(__cvta_generic_to_shared(shared));
  if constexpr (WORDS == 4) asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(to), "l"(global));
  else asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" :: "r"(to), "l"(global), "n"(4 * WORDS));
}
__device__ inline void flashmoe_copy_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ inline void flashmoe_copy_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }
// 2^v in one instruction (ex2.approx; flushes subnormal results to 0); expf takes ~8.
__device__ inline float flashmoe_exp2(float v) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
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
