// expert_swiglu, pass 1 of 2 (decode, 1-4 tokens): h[t, j, r] = silu(gate_s . x_t) * (up_s . x_t) for the
// pool slot s = slots[t, j] of each of the token's K experts. One SIMD-group computes ROWS rows of one
// (t, j); x is read once per 32-value pack and feeds 2 * ROWS dot products; float accumulation.
// Inputs: x [NT, H] (T); gate_w/up_w [S, I, H*BITS_UP/32] uint32; gate_s/gate_b/up_s/up_b [S, I, H/GS_UP] (T);
// slots [NT, K] uint32. Output: h [NT, K, I] float. Template constants: T, NT, K, H, I, BITS_UP, GS_UP.
constexpr uint32_t ROWS = 4;
constexpr uint32_t PACKS = H / 32;
constexpr uint32_t ROW_WORDS = H * BITS_UP / 32;
constexpr uint32_t ROW_GROUPS = H / GS_UP;
constexpr uint32_t BLOCKS = (I + ROWS - 1) / ROWS;
const uint32_t simd = TG * (TG_THREADS / 32) + SIMD_IN_TG;
if (simd >= NT * K * BLOCKS) return;  // a whole SIMD-group leaves together
const uint32_t t = simd / (K * BLOCKS);
const uint32_t j = (simd / BLOCKS) % K;
const uint32_t r0 = (simd % BLOCKS) * ROWS;
const uint32_t slot = slots[t * K + j];
float g[ROWS], u[ROWS];
for (uint32_t r = 0; r < ROWS; ++r) { g[r] = 0.0f; u[r] = 0.0f; }
for (uint32_t p = LANE; p < PACKS; p += 32) {
  float xs[32];
  float xsum = 0.0f;
  for (int i = 0; i < 32; ++i) { xs[i] = float(x[t * H + p * 32 + i]); xsum += xs[i]; }
  const uint32_t group = p * 32 / GS_UP;
  for (uint32_t r = 0; r < ROWS && r0 + r < I; ++r) {
    const uint32_t row = slot * I + r0 + r;
    g[r] += flashmoe_pack_dot<BITS_UP>(gate_w + row * ROW_WORDS + p * BITS_UP, xs, float(gate_s[row * ROW_GROUPS + group]),
                              float(gate_b[row * ROW_GROUPS + group]), xsum);
    u[r] += flashmoe_pack_dot<BITS_UP>(up_w + row * ROW_WORDS + p * BITS_UP, xs, float(up_s[row * ROW_GROUPS + group]),
                              float(up_b[row * ROW_GROUPS + group]), xsum);
  }
}
for (uint32_t r = 0; r < ROWS; ++r) {
  const float gate = SIMD_SUM(g[r]);
  const float up = SIMD_SUM(u[r]);
  if (LANE == 0 && r0 + r < I) h[(t * K + j) * I + r0 + r] = flashmoe_silu(gate) * up;
}
