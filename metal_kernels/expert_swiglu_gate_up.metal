// expert_swiglu, pass 1 of 2 (decode, 1-4 tokens): h[t, j, r] = silu(gate_s . x_t) * (up_s . x_t) for the
// pool slot s = slots[t, j] of each of the token's K experts. A threadgroup serves one token: it stages
// x_t in threadgroup memory once (as floats, pre-scaled, padded to 33 per pack so the 32 lanes reading 32
// different packs hit 32 different banks), then each SIMD-group computes ROWS rows of one expert. Lanes take
// whole 32-value packs (p = LANE + 32 n): a row is read in coalesced 16-byte loads, and per pack all 2 * ROWS
// weight chunks are loaded before any arithmetic so their latencies overlap. The kernel is bound by load
// latency, not arithmetic (on an H200 its loads alone take 83% of its time), so what counts is how many
// SIMD-groups are resident: x_i is read from threadgroup memory as each value needs it, not copied into 32
// registers, and few rows per SIMD-group (kernels.UP_ROWS) make many SIMD-groups. (Loading the next pack during
// this one's arithmetic, or two packs at once, measured no faster.) Float accumulation.
// h is written pack-transposed, h[t, j, i * I/32 + p] for row 32 p + i, so that pass 2's lanes, one pack
// each, read it coalesced.
// Inputs: x [NT, H] (T); gate_w/up_w [S, I, H*BITS_UP/32] uint32; gate_s/gate_b/up_s/up_b [S, I, H/GS_UP] (T);
// slots [NT, K] uint32. Output: h [NT, K, I] float. Template constants: T, NT, K, H, I, BITS_UP, GS_UP, ROWS.
// Threadgroups: NT * TG_PER_TOKEN (see below), any whole number of SIMD-groups each.
constexpr uint32_t PACKS = H / 32;
constexpr uint32_t ROW_WORDS = H * BITS_UP / 32;
constexpr uint32_t ROW_GROUPS = H / GS_UP;
constexpr uint32_t BLOCKS = (I + ROWS - 1) / ROWS;
constexpr int ALIGN = flashmoe_pack_align(BITS_UP, ROW_WORDS);
SHARED(float, xs_all, PACKS * 33);
SHARED(float, xsums, PACKS);
const uint32_t warps = TG_THREADS / 32;
const uint32_t tg_per_token = (K * BLOCKS + warps - 1) / warps;
const uint32_t t = TG / tg_per_token;
const uint32_t tid = SIMD_IN_TG * 32 + LANE;
for (uint32_t e = tid; e < H; e += TG_THREADS) xs_all[e / 32 * 33 + e % 32] = float(x[t * H + e]);
BARRIER();
for (uint32_t p = tid; p < PACKS; p += TG_THREADS) {
  float sum = 0.0f;
  for (uint32_t i = 0; i < 32; ++i) {
    sum += xs_all[p * 33 + i];
    xs_all[p * 33 + i] *= flashmoe_prescale<BITS_UP>(i);
  }
  xsums[p] = sum;
}
BARRIER();
const uint32_t work = (TG % tg_per_token) * warps + SIMD_IN_TG;  // (expert, row block) of this SIMD-group
if (work >= K * BLOCKS) return;  // after the barriers: a whole SIMD-group leaves together
const uint32_t j = work / BLOCKS;
const uint32_t r0 = (work % BLOCKS) * ROWS;
const uint32_t slot = slots[t * K + j];
uint32_t rows[ROWS];  // rows past I (the last block) recompute row I - 1: no branches; never written
UNROLL for (uint32_t r = 0; r < ROWS; ++r) rows[r] = slot * I + (r0 + r < I ? r0 + r : I - 1);
float g[ROWS], u[ROWS];
UNROLL for (uint32_t r = 0; r < ROWS; ++r) { g[r] = 0.0f; u[r] = 0.0f; }
for (uint32_t p = LANE; p < PACKS; p += 32) {
  uint32_t gw[ROWS * BITS_UP], uw[ROWS * BITS_UP];
  float gs[ROWS], gb[ROWS], us[ROWS], ub[ROWS];
  flashmoe_load_pack<BITS_UP, ROWS, ALIGN>(gate_w, gate_s, gate_b, rows, ROW_WORDS, ROW_GROUPS, p, p * 32 / GS_UP, gw, gs, gb);
  flashmoe_load_pack<BITS_UP, ROWS, ALIGN>(up_w, up_s, up_b, rows, ROW_WORDS, ROW_GROUPS, p, p * 32 / GS_UP, uw, us, ub);
  float pg[ROWS], pu[ROWS];
  UNROLL for (uint32_t r = 0; r < ROWS; ++r) { pg[r] = 0.0f; pu[r] = 0.0f; }
  UNROLL for (int i = 0; i < 32; ++i) {
    const float xi = xs_all[p * 33 + i];
    UNROLL for (uint32_t r = 0; r < ROWS; ++r) {
      pg[r] += flashmoe_value<BITS_UP>(gw + r * BITS_UP, i) * xi;
      pu[r] += flashmoe_value<BITS_UP>(uw + r * BITS_UP, i) * xi;
    }
  }
  const float xsum = xsums[p];
  UNROLL for (uint32_t r = 0; r < ROWS; ++r) {
    g[r] += gs[r] * pg[r] + gb[r] * xsum;
    u[r] += us[r] * pu[r] + ub[r] * xsum;
  }
}
UNROLL for (uint32_t r = 0; r < ROWS; ++r) {
  const float gate = SIMD_SUM(g[r]);
  const float up = SIMD_SUM(u[r]);
  const uint32_t row = r0 + r;
  if (LANE == 0 && row < I) h[(t * K + j) * I + row % 32 * (I / 32) + row / 32] = flashmoe_silu(gate) * up;
}
