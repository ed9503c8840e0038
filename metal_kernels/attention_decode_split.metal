// attention_decode, pass 1 of 2: flash decoding of one query token over an MLX-affine quantized KV cache.
// One SIMD-group per (batch, query head, split of the keys). Lanes score one key each (a dequantizing dot
// product over D), an online softmax runs across the SIMD-group, and each lane accumulates D/32 output
// dimensions (d = LANE + 32 i) from the value rows. GQA: query head h reads kv head h / (HQ / HKV).
// Inputs: q [B, HQ, D] (T); k_w, v_w [B, HKV, N, D*BITS/32] uint32; k_s, k_b, v_s, v_b [B, HKV, N, D/GS] (T);
// scale [1] float. Outputs: o [B, HQ, SPLITS, D] float (unnormalised), ml [B, HQ, SPLITS, 2] float (max, sum).
// Template constants: T, HQ, HKV, D, BITS, GS, SPLITS. B and N come from k_w's shape.
constexpr uint32_t PACKS = D / 32;
constexpr uint32_t ROW_WORDS = D * BITS / 32;
constexpr uint32_t ROW_GROUPS = D / GS;
constexpr uint32_t DIMS = D / 32;
constexpr float LOWEST = -3.0e38f;
const uint32_t B = k_w_shape[0];
const uint32_t N = k_w_shape[2];
const uint32_t simd = TG * (TG_THREADS / 32) + SIMD_IN_TG;
if (simd >= B * HQ * SPLITS) return;
const uint32_t split = simd % SPLITS;
const uint32_t head = (simd / SPLITS) % HQ;
const uint32_t b = simd / (SPLITS * HQ);
const uint32_t row0 = (b * HKV + head / (HQ / HKV)) * N;  // cache row of key 0 for this query head
const uint32_t per_split = (N + SPLITS - 1) / SPLITS;
const uint32_t n0 = split * per_split;
const uint32_t n1 = n0 + per_split < N ? n0 + per_split : N;
const float qk_scale = scale[0];
float m = LOWEST, l = 0.0f;
float acc[DIMS];
for (uint32_t i = 0; i < DIMS; ++i) acc[i] = 0.0f;
for (uint32_t c = n0; c < n1; c += 32) {
  const uint32_t n = c + LANE;
  float s = LOWEST;
  if (n < n1) {
    const uint32_t row = row0 + n;
    float dot = 0.0f;
    for (uint32_t p = 0; p < PACKS; ++p) {
      float qs[32];
      float qsum = 0.0f;
      for (int i = 0; i < 32; ++i) { qs[i] = float(q[(b * HQ + head) * D + p * 32 + i]); qsum += qs[i]; }
      const uint32_t g = row * ROW_GROUPS + p * 32 / GS;
      dot += flashmoe_pack_dot<BITS>(k_w + row * ROW_WORDS + p * BITS, qs, float(k_s[g]), float(k_b[g]), qsum);
    }
    s = dot * qk_scale;
  }
  const float chunk_max = SIMD_MAX(s);
  const float m_new = m > chunk_max ? m : chunk_max;
  const float weight = n < n1 ? EXP(s - m_new) : 0.0f;
  const float rescale = EXP(m - m_new);
  l = l * rescale + SIMD_SUM(weight);
  for (uint32_t i = 0; i < DIMS; ++i) acc[i] *= rescale;
  const uint32_t count = n1 - c < 32 ? n1 - c : 32;
  for (uint32_t j = 0; j < count; ++j) {
    const float wj = SIMD_SHUFFLE(weight, j);
    const uint32_t row = row0 + c + j;
    for (uint32_t i = 0; i < DIMS; ++i) {
      const uint32_t d = LANE + 32 * i, bit = d * BITS, word = bit / 32, shift = bit % 32;
      uint32_t bits = v_w[row * ROW_WORDS + word] >> shift;
      if (shift + BITS > 32) bits |= v_w[row * ROW_WORDS + word + 1] << (32 - shift);
      const uint32_t g = row * ROW_GROUPS + d / GS;
      acc[i] += wj * (float(v_s[g]) * flashmoe_q_to_float(bits & ((1u << BITS) - 1u)) + float(v_b[g]));
    }
  }
  m = m_new;
}
const uint32_t out = (b * HQ + head) * SPLITS + split;
for (uint32_t i = 0; i < DIMS; ++i) o[out * D + LANE + 32 * i] = acc[i];
if (LANE == 0) { ml[out * 2] = m; ml[out * 2 + 1] = l; }
