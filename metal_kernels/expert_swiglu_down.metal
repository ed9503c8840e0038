// expert_swiglu, pass 2 of 2: the down projection of pass 1's h, and, with COMBINE, the routing-weighted sum
// over the token's K experts: y[t, r] = sum_j weights[t, j] * (down_s . h[t, j]). Without COMBINE each
// expert's row is written apart: y[t, j, r]. One SIMD-group computes ROWS rows; float accumulation.
// Inputs: h [NT, K, I] float; down_w [S, H, I*BITS_DOWN/32] uint32; down_s/down_b [S, H, I/GS_DOWN] (T);
// slots [NT, K] uint32; weights [NT, K] (T). Output: y [NT, H] or [NT, K, H] (T).
// Template constants: T, NT, K, H, I, BITS_DOWN, GS_DOWN, COMBINE.
constexpr uint32_t ROWS = 4;
constexpr uint32_t PACKS = I / 32;
constexpr uint32_t ROW_WORDS = I * BITS_DOWN / 32;
constexpr uint32_t ROW_GROUPS = I / GS_DOWN;
constexpr uint32_t BLOCKS = (H + ROWS - 1) / ROWS;
constexpr uint32_t SPLITS = COMBINE ? 1 : K;  // SIMD-groups per row block: one per expert unless combining
const uint32_t simd = TG * (TG_THREADS / 32) + SIMD_IN_TG;
if (simd >= NT * SPLITS * BLOCKS) return;
const uint32_t t = simd / (SPLITS * BLOCKS);
const uint32_t split = (simd / BLOCKS) % SPLITS;
const uint32_t r0 = (simd % BLOCKS) * ROWS;
float acc[ROWS];
for (uint32_t r = 0; r < ROWS; ++r) acc[r] = 0.0f;
for (uint32_t e = 0; e < (COMBINE ? K : 1); ++e) {
  const uint32_t j = COMBINE ? e : split;
  const uint32_t slot = slots[t * K + j];
  const float weight = COMBINE ? float(weights[t * K + j]) : 1.0f;
  for (uint32_t p = LANE; p < PACKS; p += 32) {
    float hs[32];
    float hsum = 0.0f;
    for (int i = 0; i < 32; ++i) { hs[i] = h[(t * K + j) * I + p * 32 + i]; hsum += hs[i]; }
    const uint32_t group = p * 32 / GS_DOWN;
    for (uint32_t r = 0; r < ROWS && r0 + r < H; ++r) {
      const uint32_t row = slot * H + r0 + r;
      acc[r] += weight * flashmoe_pack_dot<BITS_DOWN>(down_w + row * ROW_WORDS + p * BITS_DOWN, hs,
                                             float(down_s[row * ROW_GROUPS + group]),
                                             float(down_b[row * ROW_GROUPS + group]), hsum);
    }
  }
}
for (uint32_t r = 0; r < ROWS; ++r) {
  const float sum = SIMD_SUM(acc[r]);
  if (LANE == 0 && r0 + r < H) y[(COMBINE ? t : t * K + split) * H + r0 + r] = T(sum);
}
