// expert_swiglu pass 1 on tensor cores (CUDA only; prelude_cpu.h emulates the MMA for the tests): the same h as
// expert_swiglu_gate_up.metal, for bfloat16 activations and 3- or 4-bit gate/up. Why a second body: unpacking a
// weight to float and multiplying it takes the scalar body ~3.3 instructions, and an H200 issues ~7 per byte it
// reads at full HBM rate (2 weights per byte), so that body is bound by issue and latency together. Here an MMA
// (m16n8k16, bfloat16 in, float32 accumulation) does the multiply-adds and unpacking is 11 instructions per 8
// weights at 4 bits (12 at 3). Apple GPUs have ~2.5x the arithmetic per byte, so Metal keeps the scalar
// body. Measured on an H200 at Qwen3.5's shape, layers in a chain: 18.8 us at 4 bits and 20.6 at 3 against the
// scalar body's 23.4 at either (docs/BENCHMARKS.md); both still bound by latency.
//
// An MMA's 16 k-slots may hold any 16 of a row's values as long as W and x agree. Lane (g, c) = (LANE / 4,
// LANE % 4) loads rows g and g + 8 of its 16-row tile, pack 8 b + 4 s + c (BITS_UP words each), and in MMA (s, i)
// fills its k-slots with the pack's pairs 2 i and 2 i + 1 (code_pair below: two values as the bfloat16 pair
// 128 + q, one FMA removes the 128, exact). x's pairs are staged in the same order. x's column n holds pack
// 8 b + n's values and zeros elsewhere (B[k][n] != 0 only where lane c's pack is n), so output column n is pack
// n's dot product alone, and each pack gets its own group's scale and bias:
//   gate_r += sum_n scale(r, n) * (q . x)_n + bias(r, n) * (sum x)_n.
// A tile's packs are shared among KSPLIT SIMD-groups, which meet in threadgroup memory; h is written
// pack-transposed, as the scalar body writes it. Inputs and output as expert_swiglu_gate_up.metal; T is bfloat16.
// Template constants: T, NT, K, H, I, BITS_UP (3 or 4), GS_UP, KSPLIT, TILES_PER_TG (SIMD-groups per threadgroup:
// their product), ROUND (blocks whose loads are in flight together).
// Requires H % 256 == 0 and I % 32 == 0. Threadgroups: NT * K * ceil(I / 16 / TILES_PER_TG).
constexpr uint32_t PACKS = H / 32;
constexpr uint32_t ROW_WORDS = H * BITS_UP / 32;
constexpr int ALIGN = flashmoe_pack_align(BITS_UP, ROW_WORDS);
constexpr uint32_t ROW_GROUPS = H / GS_UP;
constexpr uint32_t BLOCKS = PACKS / 8;  // 8 packs: one MMA output column each
constexpr uint32_t TILES = I / 16;
constexpr uint32_t TG_PER_EXPERT = (TILES + TILES_PER_TG - 1) / TILES_PER_TG;
constexpr uint32_t THREADS = KSPLIT * TILES_PER_TG * 32;
constexpr uint32_t PAIR_STRIDE = 18;  // a pack's 16 pairs of x, padded: the 4 packs read at once hit other banks
constexpr bool ONE_GROUP = GS_UP >= 64;  // a lane's two packs (2c, 2c + 1 of a block) share a scale and bias
constexpr uint32_t GROUPS = ONE_GROUP ? 1 : 2;
SHARED(uint32_t, xp, PACKS * PAIR_STRIDE);
SHARED(float, xsums, PACKS);
SHARED(float, partial, THREADS);
const uint32_t t = TG / (K * TG_PER_EXPERT);
const uint32_t j = TG / TG_PER_EXPERT % K;
const uint32_t tid = SIMD_IN_TG * 32 + LANE;
const uint32_t tile_in_tg = SIMD_IN_TG / KSPLIT, part = SIMD_IN_TG % KSPLIT;
const uint32_t tile = TG % TG_PER_EXPERT * TILES_PER_TG + tile_in_tg;
const uint32_t g = LANE / 4, c = LANE % 4;
const uint32_t row0 = slots[t * K + j] * I + (tile < TILES ? tile : TILES - 1) * 16 + g;  // rows row0, row0 + 8
// A round is ROUND blocks whose loads (weights, scales, biases) are all issued before any arithmetic, so it costs
// one memory latency; the first round's is issued before the activations are staged, and overlaps that.
uint32_t gw[ROUND][2][2][BITS_UP], uw[ROUND][2][2][BITS_UP];  // [block][row g / g + 8][pack 4 s + c][word]
float gs[ROUND][2][2 * GROUPS], us[ROUND][2][2 * GROUPS];  // [block][row][scale, bias of each group]
const auto load_round = [&](uint32_t b0) {
  UNROLL for (uint32_t q = 0; q < ROUND; ++q) {
    const uint32_t b = b0 + q < BLOCKS ? b0 + q : BLOCKS - 1;  // a block past the end is loaded, never added
    UNROLL for (uint32_t v = 0; v < 2; ++v) {
      UNROLL for (uint32_t s = 0; s < 2; ++s) {
        const uint32_t offset = (row0 + 8 * v) * ROW_WORDS + (8 * b + 4 * s + c) * BITS_UP;
        flashmoe_load_words<BITS_UP, ALIGN>(gate_w + offset, gw[q][v][s]);
        flashmoe_load_words<BITS_UP, ALIGN>(up_w + offset, uw[q][v][s]);
      }
      UNROLL for (uint32_t n = 0; n < GROUPS; ++n) {
        const uint32_t group = (row0 + 8 * v) * ROW_GROUPS + (8 * b + 2 * c + n) * 32 / GS_UP;
        gs[q][v][2 * n] = float(gate_s[group]);
        gs[q][v][2 * n + 1] = float(gate_b[group]);
        us[q][v][2 * n] = float(up_s[group]);
        us[q][v][2 * n + 1] = float(up_b[group]);
      }
    }
  }
};
load_round(part * ROUND);
// x as each pack's 16 pairs, in code_pair's order: pair 4 w + m holds values 8 w + m and 8 w + m + 4, the first
// divided by LOW_SCALE (exact: a power of two). 8 pairs per thread and step, from two 16-byte loads of 8 values.
constexpr float LOW_SCALE = BITS_UP == 4 ? 1.0f : 16.0f;  // what code_pair's low half carries the code times
for (uint32_t u = tid; u < H / 16; u += THREADS) {
  const DEVICE uint32_t* words = reinterpret_cast<const DEVICE uint32_t*>(x + t * H + 16 * u);
  uint32_t v[2][4];  // words 2 u and 2 u + 1 of 8 values
  flashmoe_load4(words, v[0]);
  flashmoe_load4(words + 4, v[1]);
  UNROLL for (uint32_t i = 0; i < 8; ++i) {
    const uint32_t* w = v[i / 4];
    const uint32_t m = i % 4;
    uint32_t pair = flashmoe_byte_perm(w[m / 2], w[m / 2 + 2], m % 2 ? 0x7632u : 0x5410u);
    if (BITS_UP != 4) pair = flashmoe_bf16x2(flashmoe_bf16_float(pair) / LOW_SCALE, flashmoe_bf16_float(pair >> 16));
    xp[u / 2 * PAIR_STRIDE + 8 * (u % 2) + i] = pair;
  }
}
BARRIER();
for (uint32_t p = tid; p < PACKS; p += THREADS) {
  float sum = 0.0f;
  UNROLL for (uint32_t u = 0; u < 16; ++u)
    sum += LOW_SCALE * flashmoe_bf16_float(xp[p * PAIR_STRIDE + u]) + flashmoe_bf16_float(xp[p * PAIR_STRIDE + u] >> 16);
  xsums[p] = sum;
}
BARRIER();
// Pair P = 4 w + m (0..15) of a pack's codes, values 8 w + m and 8 w + m + 4, as the bfloat16 pair (128 + q_lo *
// LOW_SCALE, 128 + q_hi): the two fields brought to bits log2(LOW_SCALE) and 16 of one word and put under 128's
// exponent by one LOP3. 4 bits: nibbles m and m + 4 of word w are 16 bits apart already (a shift). 3 bits: the
// fields are 12 bits apart, so the low one goes to bit 4 (16 q: exact in bfloat16, x's partner divided by 16):
// one funnel shift over the pack's words with a zero word before them (fields across words included).
const auto code_pair = [](const uint32_t* words, uint32_t P) {
  if (BITS_UP == 4) return flashmoe_nibble_pair(words[P / 4] >> (4 * (P % 4)));
  const uint32_t low = 24 * (P / 4) + 3 * (P % 4);  // the low field's first bit in the pack
  const uint32_t k = (low + 28) / 32, shift = (low + 28) % 32;  // bit low - 4, counted from the zero word
  const uint32_t below = k == 0 ? 0u : words[k - 1], above = words[k < BITS_UP ? k : BITS_UP - 1];
  return flashmoe_mask_or(flashmoe_funnel_shift(below, above, shift), 0x00070070u, 0x43004300u);
};
float gate[2] = {0.0f, 0.0f}, up[2] = {0.0f, 0.0f};
for (uint32_t b0 = part * ROUND; b0 < BLOCKS; b0 += KSPLIT * ROUND) {
  if (b0 != part * ROUND) load_round(b0);
  UNROLL for (uint32_t q = 0; q < ROUND; ++q) {
    const uint32_t b = b0 + q;
    if (b >= BLOCKS) break;
    float dg[4] = {0.0f, 0.0f, 0.0f, 0.0f}, du[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    UNROLL for (uint32_t s = 0; s < 2; ++s) {
      const bool mine = g == 4 * s + c;
      const uint32_t* pairs = xp + (8 * b + 4 * s + c) * PAIR_STRIDE;
      UNROLL for (uint32_t i = 0; i < 8; ++i) {
        const uint32_t xb[2] = {mine ? pairs[2 * i] : 0u, mine ? pairs[2 * i + 1] : 0u};
        uint32_t a[4];
        UNROLL for (uint32_t r = 0; r < 4; ++r)
          a[r] = flashmoe_bf16x2_minus_128(code_pair(gw[q][r % 2][s], 2 * i + r / 2));
        flashmoe_mma_bf16(dg, a, xb);
        UNROLL for (uint32_t r = 0; r < 4; ++r)
          a[r] = flashmoe_bf16x2_minus_128(code_pair(uw[q][r % 2][s], 2 * i + r / 2));
        flashmoe_mma_bf16(du, a, xb);
      }
    }
    const uint32_t p0 = 8 * b + 2 * c;  // this lane's output columns: packs p0, p0 + 1
    const float xs0 = xsums[p0], xs1 = xsums[p0 + 1];
    constexpr uint32_t n1 = 2 * (GROUPS - 1);  // pack p0 + 1's scale in gs[q][v]
    UNROLL for (uint32_t v = 0; v < 2; ++v) {
      gate[v] += gs[q][v][0] * dg[2 * v] + gs[q][v][1] * xs0 + gs[q][v][n1] * dg[2 * v + 1] + gs[q][v][n1 + 1] * xs1;
      up[v] += us[q][v][0] * du[2 * v] + us[q][v][1] * xs0 + us[q][v][n1] * du[2 * v + 1] + us[q][v][n1 + 1] * xs1;
    }
  }
}
UNROLL for (uint32_t v = 0; v < 2; ++v) {  // a row's four lanes hold its packs 2c, 2c + 1 of every block
  gate[v] += SIMD_SHUFFLE(gate[v], LANE ^ 1);
  gate[v] += SIMD_SHUFFLE(gate[v], LANE ^ 2);
  up[v] += SIMD_SHUFFLE(up[v], LANE ^ 1);
  up[v] += SIMD_SHUFFLE(up[v], LANE ^ 2);
  if (c == 0) {
    partial[SIMD_IN_TG * 32 + g + 8 * v] = gate[v];
    partial[SIMD_IN_TG * 32 + 16 + g + 8 * v] = up[v];
  }
}
BARRIER();
if (part == 0 && LANE < 16 && tile < TILES) {
  float gate_sum = 0.0f, up_sum = 0.0f;
  for (uint32_t k = 0; k < KSPLIT; ++k) {
    gate_sum += partial[(SIMD_IN_TG + k) * 32 + LANE];
    up_sum += partial[(SIMD_IN_TG + k) * 32 + 16 + LANE];
  }
  const uint32_t row = tile * 16 + LANE;
  h[(t * K + j) * I + row % 32 * (I / 32) + row / 32] = flashmoe_silu(gate_sum) * up_sum;
}
