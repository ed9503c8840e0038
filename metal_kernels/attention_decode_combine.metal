// attention_decode, pass 2 of 2: merge the splits of pass 1. With M = max of the splits' maxima,
// out[d] = sum_s e^(m_s - M) o_s[d] / sum_s e^(m_s - M) l_s. One SIMD-group per (batch, query head).
// Inputs: o [B, HQ, SPLITS, D] float; ml [B, HQ, SPLITS, 2] float. Output: out [B, HQ, D] (T).
// Template constants: T, HQ, D, SPLITS. B comes from o's shape.
constexpr uint32_t DIMS = D / 32;
const uint32_t simd = TG * (TG_THREADS / 32) + SIMD_IN_TG;
if (simd >= uint32_t(o_shape[0]) * HQ) return;
float top = -3.0e38f;
for (uint32_t s = 0; s < SPLITS; ++s) top = top > ml[(simd * SPLITS + s) * 2] ? top : ml[(simd * SPLITS + s) * 2];
float total = 0.0f;
for (uint32_t s = 0; s < SPLITS; ++s) total += EXP(ml[(simd * SPLITS + s) * 2] - top) * ml[(simd * SPLITS + s) * 2 + 1];
for (uint32_t i = 0; i < DIMS; ++i) {
  float v = 0.0f;
  for (uint32_t s = 0; s < SPLITS; ++s) v += EXP(ml[(simd * SPLITS + s) * 2] - top) * o[(simd * SPLITS + s) * D + LANE + 32 * i];
  out[simd * D + LANE + 32 * i] = T(v / total);
}
