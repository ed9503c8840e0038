// CPU emulation prelude: runs the Metal kernel bodies as C++ (g++) so that tests execute them on a machine
// without a GPU. Every thread of a threadgroup is an OS thread; a SIMD-group's 32 threads meet at a
// std::barrier to sum, and the whole threadgroup at another for BARRIER(). Slow and exact in structure: for
// correctness, never for speed.
#include <barrier>
#include <bit>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <atomic>
#include <deque>
#include <thread>
#include <vector>
#define DEVICE
#define THREAD
#define DEVICE_FN inline
#define AS_FLOAT(u) std::bit_cast<float>(u)
#define SIMD_SUM(v) flashmoe_simd_sum(v)
#define SIMD_MAX(v) flashmoe_simd_max(v)
#define SIMD_SHUFFLE(v, lane) flashmoe_simd_shuffle(v, lane)
#define SIMD_ANY(p) (flashmoe_simd_max((p) ? 1.0f : 0.0f) > 0.0f)
// Threadgroups run one after another, so one static array per declaration is the group's shared memory.
#define SHARED(type, name, n) static type name[n]
#define BARRIER() flashmoe_group->arrive_and_wait()
#define EXP(v) std::exp(v)
#define EXP2(v) std::exp2(v)
#define FMA(a, b, c) std::fma(a, b, c)  // one rounding, as on the GPUs (x86 without -mfma: in software)
#define UNROLL _Pragma("GCC unroll 32")
struct alignas(16) float4 { float x, y, z, w; };
#define FLOAT4(a, b, c, d) float4{a, b, c, d}
struct alignas(16) uint4 { uint32_t x, y, z, w; };
#define SIMD_BARRIER() flashmoe_simd->meet.arrive_and_wait()
// bfloat16 as MLX stores it (the top half of a float32), for T = bfloat16 and the tensor-core helpers.
struct bfloat16 {
  uint16_t bits;
  bfloat16() = default;
  explicit bfloat16(float f) {  // round to nearest even, as the GPUs convert
    const uint32_t u = std::bit_cast<uint32_t>(f);
    bits = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  operator float() const { return std::bit_cast<float>(uint32_t(bits) << 16); }
};
#define BF16_BITS(v) (v).bits
inline float flashmoe_bf16_float(uint32_t bits16) { return std::bit_cast<float>((bits16 & 0xFFFFu) << 16); }
inline void flashmoe_load4(const uint32_t* s, uint32_t* d) { std::memcpy(d, s, 16); }
inline void flashmoe_load2(const uint32_t* s, uint32_t* d) { std::memcpy(d, s, 8); }
inline uint32_t flashmoe_mask_or(uint32_t v, uint32_t mask, uint32_t bits) { return (v & mask) | bits; }

struct FlashmoeSimdGroup {
  std::barrier<> meet{32};
  float values[32];
  uint32_t fragments[32][6];  // each lane's A (4 registers) and B (2) of an emulated MMA
};
inline thread_local FlashmoeSimdGroup* flashmoe_simd = nullptr;
inline thread_local std::barrier<>* flashmoe_group = nullptr;
inline thread_local uint32_t flashmoe_lane = 0;

// Every lane posts its value, all meet, each reads what it needs, all meet again before the next exchange.
template <typename Read>
inline float flashmoe_simd_exchange(float v, Read read) {
  flashmoe_simd->values[flashmoe_lane] = v;
  flashmoe_simd->meet.arrive_and_wait();
  const float out = read(flashmoe_simd->values);
  flashmoe_simd->meet.arrive_and_wait();
  return out;
}
inline float flashmoe_simd_sum(float v) {
  return flashmoe_simd_exchange(v, [](const float* all) { float s = 0.0f; for (int i = 0; i < 32; ++i) s += all[i]; return s; });
}
inline float flashmoe_simd_max(float v) {
  return flashmoe_simd_exchange(v, [](const float* all) { float m = all[0]; for (int i = 1; i < 32; ++i) m = std::max(m, all[i]); return m; });
}
inline float flashmoe_simd_shuffle(float v, uint32_t lane) {
  return flashmoe_simd_exchange(v, [lane](const float* all) { return all[lane]; });
}

// PTX's mma.sync m16n8k16 (bf16 in, f32 accumulate) over the SIMD-group's fragments, element by element:
// A[r][k] sits in lane (r % 8) * 4 + (k % 8) / 2, register r / 8 + 2 (k / 8), half k % 2; B[k][n] in lane
// n * 4 + (k % 8) / 2, register k / 8, half k % 2; D[r][n] in lane (r % 8) * 4 + n / 2, register 2 (r / 8) + n % 2.
inline void flashmoe_mma_bf16(float* d, const uint32_t* a, const uint32_t* b) {
  auto& all = flashmoe_simd->fragments;
  for (int i = 0; i < 4; ++i) all[flashmoe_lane][i] = a[i];
  all[flashmoe_lane][4] = b[0];
  all[flashmoe_lane][5] = b[1];
  flashmoe_simd->meet.arrive_and_wait();
  const auto half = [](uint32_t reg, int k) { return flashmoe_bf16_float(k % 2 ? reg >> 16 : reg); };
  for (int i = 0; i < 4; ++i) {
    const int r = int(flashmoe_lane) / 4 + 8 * (i / 2), n = 2 * (int(flashmoe_lane) % 4) + i % 2;
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) {
      const float av = half(all[(r % 8) * 4 + (k % 8) / 2][r / 8 + 2 * (k / 8)], k);
      const float bv = half(all[n * 4 + (k % 8) / 2][4 + k / 8], k);
      sum += av * bv;
    }
    d[i] += sum;
  }
  flashmoe_simd->meet.arrive_and_wait();
}
// cp.async with its destination undefined from issue until a wait covers its group: the issue fills it with
// all-ones words (NaN as float or bfloat16 pairs) and the data lands at the lane's wait that needs the group. So
// a body that reads a stage before waiting for it, waits for too few groups, or refills a stage that another lane
// may still be reading, reads garbage, as a GPU may.
struct FlashmoeCopy {
  uint32_t* shared;
  uint32_t words[4];
  int count;
};
inline std::atomic<int> flashmoe_faults{0};  // misaligned copies in this launch; run() returns the count
inline thread_local std::vector<FlashmoeCopy> flashmoe_open_group;             // issued since the last commit
inline thread_local std::deque<std::vector<FlashmoeCopy>> flashmoe_committed;  // oldest first
template <int WORDS>
inline void flashmoe_copy_async(uint32_t* shared, const uint32_t* global) {
  static_assert(WORDS == 1 || WORDS == 2 || WORDS == 4, "cp.async copies 4, 8 or 16 bytes");
  if (reinterpret_cast<uintptr_t>(shared) % (4 * WORDS) || reinterpret_cast<uintptr_t>(global) % (4 * WORDS))
    ++flashmoe_faults;  // a GPU faults on it; the run reports it (and the destination keeps its all-ones words)
  FlashmoeCopy copy{shared, {}, WORDS};
  std::memcpy(copy.words, global, 4 * WORDS);
  std::memset(shared, 0xFF, 4 * WORDS);
  flashmoe_open_group.push_back(copy);
}
inline void flashmoe_copy_commit() {
  flashmoe_committed.push_back(std::move(flashmoe_open_group));
  flashmoe_open_group.clear();
}
template <int N>
inline void flashmoe_copy_wait() {  // all but the N most recent committed groups land
  while (flashmoe_committed.size() > size_t(N)) {
    for (const FlashmoeCopy& copy : flashmoe_committed.front()) std::memcpy(copy.shared, copy.words, 4 * copy.count);
    flashmoe_committed.pop_front();
  }
}
inline uint32_t flashmoe_nibble_pair(uint32_t v) { return (v & 0x000F000Fu) | 0x43004300u; }
inline uint32_t flashmoe_funnel_shift(uint32_t lo, uint32_t hi, uint32_t s) {
  return uint32_t((uint64_t(hi) << 32 | lo) >> (s & 31u));
}
inline uint32_t flashmoe_bf16x2_minus_128(uint32_t v) {
  const auto minus = [](uint32_t bits16) { return std::bit_cast<uint32_t>(flashmoe_bf16_float(bits16) - 128.0f) >> 16; };
  return minus(v) | minus(v >> 16) << 16;
}
inline uint32_t flashmoe_byte_perm(uint32_t a, uint32_t b, uint32_t selector) {
  const uint64_t bytes = uint64_t(b) << 32 | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= uint32_t(bytes >> (8 * ((selector >> (4 * i)) & 7u)) & 0xFFu) << (8 * i);
  return r;
}
inline uint32_t flashmoe_bf16x2(float lo, float hi) { return bfloat16(lo).bits | uint32_t(bfloat16(hi).bits) << 16; }

// Run `body(lane, simd_in_tg, tg, tg_threads)` for every thread of `groups` threadgroups of `tg_threads`.
template <typename Body>
void flashmoe_launch(uint32_t groups, uint32_t tg_threads, Body body) {
  for (uint32_t tg = 0; tg < groups; ++tg) {
    std::vector<FlashmoeSimdGroup> simds(tg_threads / 32);
    std::barrier<> group(tg_threads);
    std::vector<std::thread> threads;
    for (uint32_t i = 0; i < tg_threads; ++i) {
      threads.emplace_back([&, i] {
        flashmoe_group = &group;
        flashmoe_simd = &simds[i / 32];
        flashmoe_lane = i % 32;
        body(i % 32, i / 32, tg, tg_threads);
      });
    }
    for (auto& t : threads) t.join();
  }
}
// ---- prologue ----
