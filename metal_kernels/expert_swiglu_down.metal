// expert_swiglu, pass 2 of 2: the down projection of pass 1's h and, with COMBINE, the routing-weighted sum
// over the token's K experts: y[t, r] = sum_j weights[t, j] * (down_s . h[t, j]). Without COMBINE each
// expert's rows are written apart: y[t, j, r]. A threadgroup is K SIMD-groups, one per expert, over the same
// ROWS rows (so the whole card is busy even for one token); with COMBINE they meet in threadgroup memory.
// As in pass 1: lanes take whole packs, all ROWS weight chunks are loaded before the arithmetic, and the
// lane's 32 values of h are pre-scaled once for all ROWS rows (no pipeline across packs: at I <= 1024 a
// lane has one). Float accumulation.
// Inputs: h [NT, K, I] float, pack-transposed by pass 1 (value i of pack p at i * I/32 + p: the lanes' loads
// are coalesced); down_w [S, H, I*BITS_DOWN/32] uint32; down_s/down_b [S, H, I/GS_DOWN] (T);
// slots [NT, K] uint32; weights [NT, K] (T). Output: y [NT, H] or [NT, K, H] (T).
// Template constants: T, NT, K, H, I, BITS_DOWN, GS_DOWN, COMBINE, ROWS (a power of two, <= 32). Threadgroup:
// 32 * K threads.
constexpr uint32_t PACKS = I / 32;
constexpr uint32_t ROW_WORDS = I * BITS_DOWN / 32;
constexpr uint32_t ROW_GROUPS = I / GS_DOWN;
constexpr uint32_t BLOCKS = (H + ROWS - 1) / ROWS;
constexpr int ALIGN = flashmoe_pack_align(BITS_DOWN, ROW_WORDS);
SHARED(float, parts, K * ROWS);
const uint32_t t = TG / BLOCKS;
const uint32_t r0 = (TG % BLOCKS) * ROWS;
const uint32_t j = SIMD_IN_TG;
const uint32_t slot = slots[t * K + j];
uint32_t rows[ROWS];  // rows past H: as in pass 1
UNROLL for (uint32_t r = 0; r < ROWS; ++r) rows[r] = slot * H + (r0 + r < H ? r0 + r : H - 1);
float acc[ROWS];
UNROLL for (uint32_t r = 0; r < ROWS; ++r) acc[r] = 0.0f;
for (uint32_t p = LANE; p < PACKS; p += 32) {
  uint32_t dw[ROWS * BITS_DOWN];
  float ds[ROWS], db[ROWS];
  flashmoe_load_pack<BITS_DOWN, ROWS, ALIGN>(down_w, down_s, down_b, rows, ROW_WORDS, ROW_GROUPS, p, p * 32 / GS_DOWN, dw, ds, db);
  float hs[32];
  float hsum = 0.0f;
  UNROLL for (int i = 0; i < 32; ++i) {
    const float v = h[(t * K + j) * I + i * PACKS + p];
    hsum += v;
    hs[i] = v * flashmoe_prescale<BITS_DOWN>(i);
  }
  UNROLL for (uint32_t r = 0; r < ROWS; ++r) acc[r] += ds[r] * flashmoe_pack_dot<BITS_DOWN>(dw + r * BITS_DOWN, hs) + db[r] * hsum;
}
const float weight = COMBINE ? float(weights[t * K + j]) : 1.0f;
const float sum = flashmoe_rows_sum<ROWS>(acc, LANE);  // row r0 + LANE's, in lanes < ROWS
if (LANE < ROWS && r0 + LANE < H) {
  if (COMBINE) parts[j * ROWS + LANE] = weight * sum;
  else y[(t * K + j) * H + r0 + LANE] = T(sum);
}
if (COMBINE) {
  BARRIER();
  if (j == 0 && LANE < ROWS && r0 + LANE < H) {
    float total = 0.0f;
    for (uint32_t e = 0; e < K; ++e) total += parts[e * ROWS + LANE];
    y[t * H + r0 + LANE] = T(total);
  }
}
