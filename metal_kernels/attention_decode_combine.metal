// attention_decode, pass 2 of 2: merge the splits of pass 1. With M = max of the splits' maxima,
// out[d] = sum_s e^(m_s - M) o_s[d] / sum_s e^(m_s - M) l_s. One threadgroup of WARPS SIMD-groups per
// (batch, query head, 32 dims). Every load is issued first, none depending on another, so the pass waits on
// memory once: SIMD-group w's share of o (splits w, w + WARPS, ..., lane = dim: coalesced) and each thread's
// (m_s, l_s). Then its threads find M, each split's factor e^(m_s - M) (one exp per split, not per lane) and the
// denominator; SIMD-group w sums its splits, and SIMD-group 0 adds up the WARPS partial vectors.
// Inputs: o [B, HQ, SPLITS, D] float; ml [B, HQ, SPLITS, 2] float. Output: out [B, HQ, 1, D] (T).
// Template constants: T, HQ, D, SPLITS, WARPS (threadgroup: 32 * WARPS). Grid: B * HQ * D / 32 threadgroups.
// Threadgroup memory, in floats: SPLITS + WARPS * 34 (kernels.py counts it).
constexpr uint32_t SHARE = (SPLITS + WARPS - 1) / WARPS;  // splits per SIMD-group, at most
constexpr uint32_t OWN = (SPLITS + 32 * WARPS - 1) / (32 * WARPS);  // splits whose (m, l) a thread reads, at most
SHARED(float, factor, SPLITS);          // e^(m_s - M)
SHARED(float, partial, WARPS * 32);     // per SIMD-group: its splits' sum, per dim
SHARED(float, top_of, WARPS);           // per SIMD-group: the max of its threads' m_s
SHARED(float, total_of, WARPS);         // per SIMD-group: its threads' share of the denominator
const uint32_t tid = SIMD_IN_TG * 32 + LANE;
const uint32_t head = TG / (D / 32);  // (batch, query head)
const uint32_t d = TG % (D / 32) * 32 + LANE;
const uint32_t first = head * SPLITS;  // row of its split 0 in o and ml
float share[SHARE];  // o of splits SIMD_IN_TG + WARPS i at dim d
UNROLL for (uint32_t i = 0; i < SHARE; ++i) {
  const uint32_t s = i * WARPS + SIMD_IN_TG;
  share[i] = s < SPLITS ? o[(first + s) * D + d] : 0.0f;
}
float m_of[OWN], l_of[OWN];  // (m, l) of splits tid + 32 WARPS i
UNROLL for (uint32_t i = 0; i < OWN; ++i) {
  const uint32_t s = tid + i * 32 * WARPS;
  m_of[i] = s < SPLITS ? ml[(first + s) * 2] : -3.0e38f;
  l_of[i] = s < SPLITS ? ml[(first + s) * 2 + 1] : 0.0f;
}
float top = -3.0e38f;
UNROLL for (uint32_t i = 0; i < OWN; ++i) top = top > m_of[i] ? top : m_of[i];
top = SIMD_MAX(top);
if (LANE == 0) top_of[SIMD_IN_TG] = top;
BARRIER();
UNROLL for (uint32_t w = 0; w < WARPS; ++w) top = top > top_of[w] ? top : top_of[w];
float total = 0.0f;
UNROLL for (uint32_t i = 0; i < OWN; ++i) {
  const uint32_t s = tid + i * 32 * WARPS;
  if (s < SPLITS) {
    factor[s] = EXP(m_of[i] - top);
    total += factor[s] * l_of[i];
  }
}
total = SIMD_SUM(total);
if (LANE == 0) total_of[SIMD_IN_TG] = total;
BARRIER();
float v = 0.0f;
UNROLL for (uint32_t i = 0; i < SHARE; ++i) {
  const uint32_t s = i * WARPS + SIMD_IN_TG;
  if (s < SPLITS) v += factor[s] * share[i];
}
partial[tid] = v;
BARRIER();
if (SIMD_IN_TG == 0) {
  float sum = 0.0f;
  total = 0.0f;
  UNROLL for (uint32_t w = 0; w < WARPS; ++w) {
    sum += partial[w * 32 + LANE];
    total += total_of[w];
  }
  out[head * D + d] = T(sum / total);
}
