// attention_decode, pass 2 of 2: merge the splits of pass 1. With M = max of the splits' maxima,
// out[d] = sum_s e^(m_s - M) o_s[d] / sum_s e^(m_s - M) l_s. One SIMD-group per (batch, query head, 32
// dims), lane = dim: the loads of o are coalesced and independent across splits (no serial chain of them).
// Inputs: o [B, HQ, SPLITS, D] float; ml [B, HQ, SPLITS, 2] float. Output: out [B, HQ, D] (T).
// Template constants: T, HQ, D, SPLITS. B comes from o's shape.
const uint32_t simd = TG * (TG_THREADS / 32) + SIMD_IN_TG;
if (simd >= uint32_t(o_shape[0]) * HQ * (D / 32)) return;
const uint32_t head = simd / (D / 32);  // (batch, query head)
const uint32_t d = simd % (D / 32) * 32 + LANE;
float top = -3.0e38f;
for (uint32_t s = LANE; s < SPLITS; s += 32) top = top > ml[(head * SPLITS + s) * 2] ? top : ml[(head * SPLITS + s) * 2];
top = SIMD_MAX(top);
float total = 0.0f, v = 0.0f;
for (uint32_t s = 0; s < SPLITS; ++s) {
  const float f = EXP(ml[(head * SPLITS + s) * 2] - top);
  total += f * ml[(head * SPLITS + s) * 2 + 1];
  v += f * o[(head * SPLITS + s) * D + d];
}
out[head * D + d] = T(v / total);
