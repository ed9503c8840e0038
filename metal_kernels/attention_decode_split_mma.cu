// attention_decode pass 1 on tensor cores (CUDA only; prelude_cpu.h emulates the MMA for the tests): the same
// partials as attention_decode_split.metal, for bfloat16 queries over a 4-bit cache with bfloat16 scales. Why a
// second body: the scalar body spends a multiply-add per cached value per query head (8 or 16 heads share a kv
// head), ~3x more issue than the H200 has per byte of HBM; here m16n8k16 MMAs (bfloat16 in, float32
// accumulation) do those, and a value costs about one instruction to unpack. Apple GPUs keep the scalar body.
//
// Each SIMD-group walks tiles of 16 keys of its share of the split. Tiles travel by cp.async into a ring of
// STAGES per SIMD-group, so loads in flight hold no registers; a lane then reads its MMA operands from there.
// - Scores S = q K^T: A = q (16 rows: the kv head's query heads, zero past G), B = K^T (8 keys per MMA). An MMA's
//   16 k-slots may hold any 16 dims as long as q and K agree: lane (g, c) = (LANE / 4, LANE % 4) takes key g's
//   words c * KC .. c * KC + KC - 1 of each group, and nibble pairs (m, m + 4) of a word are one LOP3 from the
//   bfloat16 pair 128 + q (as in expert_swiglu_gate_up_mma.cu). Each k-step stays inside one group, so
//   S += scale * acc + (bias - 128 * scale) * (q summed over the group), per group. Base 2: one ex2 per exp.
// - Online softmax per head; the C fragment of S is already P^T's B fragment (key pairs 2c, 2c + 1 of head g),
//   so P never leaves registers. P is rounded to bfloat16 once, as flash attention does.
// - Values O^T += V^T P^T: A = V^T (16 dims, all in one group, so the group's V scale goes into P), B = P^T
//   (8 heads). V^T's pairs are two keys' nibbles: one byte permute per two pairs and one LOP3 per pair give
//   128 + q; one more MMA per group (A = 128) accumulates what to take off. V's biases add sum_keys P * bias per
//   (head, group), kept apart in float32. Rescaling O is skipped while no head's max moves.
// At the end the SIMD-groups merge (max, sum, O) in threadgroup memory into one partial per (head, split).
// Inputs (read through their strides), outputs and the combine pass as attention_decode_split.metal (ml's max
// in base e). Template constants: T (bfloat16), HQ, HKV, D, GS, SPLITS, WARPS (threadgroup: 32 * WARPS),
// SCALE_BITS (as there), STAGES (tiles in flight per SIMD-group, >= 2), HEAD_GROUPS. Requires HQ / HKV <= 16,
// GS >= 64, D % GS == 0 and an even number of groups per row (the wrapper checks). Threadgroup memory:
// kernels.split_mma_shared_bytes counts it.
// HEAD_GROUPS threadgroups share a (batch, kv head, split), each taking G of its query heads: fewer heads per
// SIMD-group, fewer registers for O (at 16 heads of dim 256 the whole kv head takes 255 and spills), at the
// price of scoring and unpacking the keys once per group; adjacent threadgroups, so the later reads of the
// cache find it in L2.
constexpr uint32_t G = HQ / HKV / HEAD_GROUPS;
constexpr uint32_t HB = (G + 7) / 8;  // blocks of 8 heads: the values' MMA columns
constexpr uint32_t ROW_WORDS = D / 8;
constexpr uint32_t NG = D / GS;       // groups per row
constexpr uint32_t GW = GS / 8;       // words per group
constexpr uint32_t KC = GW / 4;       // words of a group that a lane loads for the scores (one key)
constexpr uint32_t VC = GW / 8;       // words of a group that a lane loads for the values (four keys)
constexpr uint32_t KSTEPS = D / 16;
constexpr int KALIGN = KC % 4 == 0 ? 4 : KC % 2 == 0 ? 2 : 1;
constexpr int VALIGN = VC % 4 == 0 ? 4 : VC % 2 == 0 ? 2 : 1;
constexpr float LOWEST = -3.0e38f;
SHARED(uint32_t, qa, KSTEPS * 128);   // q as the scores' A fragments, [k-step][lane][register]
SHARED(float, stats, WARPS * 32);     // per SIMD-group: (max, sum) per head
// Tiles travel by cp.async into a ring of STAGES per SIMD-group (no registers held by loads in flight): K and V
// rows, padded so that the lanes' reads below hit distinct banks, then the scales, one array after the other.
// At the end the rings hold the SIMD-groups' partial sums, [SIMD-group][head][dim, rows padded to D + 1].
constexpr uint32_t STRIDE = ROW_WORDS + 4;
constexpr uint32_t SCALE_WORDS = 16 * NG / 2;  // one array's scales (NG bfloat16 per key) of a tile
constexpr uint32_t STAGE = 32 * STRIDE + 4 * SCALE_WORDS;
constexpr uint32_t PARTIALS = (WARPS * G * (D + 1) + 3) / 4 * 4;
constexpr uint32_t POOL = WARPS * STAGES * STAGE > PARTIALS ? WARPS * STAGES * STAGE : PARTIALS;
SHARED(uint4, pool, POOL / 4);
float* merged = reinterpret_cast<float*>(pool);
const uint32_t N = k_w_shape[2];
const uint32_t split = TG / HEAD_GROUPS % SPLITS;
const uint32_t kvh = TG / (HEAD_GROUPS * SPLITS) % HKV;
const uint32_t b = TG / (HEAD_GROUPS * SPLITS * HKV);
const uint32_t head0 = kvh * (HQ / HKV) + TG % HEAD_GROUPS * G;  // this threadgroup's first query head
const uint32_t tid = SIMD_IN_TG * 32 + LANE;
const uint32_t g = LANE / 4, c = LANE % 4;
const DEVICE T* q_kv = q + b * q_strides[0] + head0 * q_strides[1];
const float qk_scale = AS_FLOAT(uint32_t(SCALE_BITS)) * 1.44269504f;  // scores in base 2: one ex2 per exponential
// Keys of this SIMD-group: its share of the split, whole tiles of 16.
const uint32_t per_split = (N + SPLITS - 1) / SPLITS;
const uint32_t per_warp = ((per_split + WARPS - 1) / WARPS + 15) / 16 * 16;
const uint32_t split_end = (split + 1) * per_split < N ? (split + 1) * per_split : N;
const uint32_t n0 = split * per_split + SIMD_IN_TG * per_warp;
const uint32_t n1 = n0 + per_warp < split_end ? n0 + per_warp : split_end;
uint32_t* ring = reinterpret_cast<uint32_t*>(pool) + SIMD_IN_TG * STAGES * STAGE;
const DEVICE uint32_t* kw_rows = k_w + b * k_w_strides[0] + kvh * k_w_strides[1];  // key 0's rows
const DEVICE uint32_t* vw_rows = v_w + b * v_w_strides[0] + kvh * v_w_strides[1];
const DEVICE uint32_t* scale_rows[4] = {  // a key's NG scales (or biases) as NG / 2 words
    reinterpret_cast<const DEVICE uint32_t*>(k_s + b * k_s_strides[0] + kvh * k_s_strides[1]),
    reinterpret_cast<const DEVICE uint32_t*>(k_b + b * k_b_strides[0] + kvh * k_b_strides[1]),
    reinterpret_cast<const DEVICE uint32_t*>(v_s + b * v_s_strides[0] + kvh * v_s_strides[1]),
    reinterpret_cast<const DEVICE uint32_t*>(v_b + b * v_b_strides[0] + kvh * v_b_strides[1])};
const uint32_t tiles = n0 < n1 ? (n1 - n0 + 15) / 16 : 0;
const auto issue = [&](uint32_t t) {  // tile t of this SIMD-group into stage t % STAGES; keys past the share: its last
  if (t < tiles) {
    const uint32_t c0 = n0 + 16 * t;
    uint32_t* stage = ring + t % STAGES * STAGE;
    UNROLL for (uint32_t e0 = 0; e0 < 4 * ROW_WORDS; e0 += 32) {  // 16 rows of ROW_WORDS / 4 chunks of 16 bytes
      const uint32_t row = (e0 + LANE) / (ROW_WORDS / 4), col = (e0 + LANE) % (ROW_WORDS / 4) * 4;
      const uint32_t key = c0 + row < n1 ? c0 + row : n1 - 1;
      flashmoe_copy_async<4>(stage + row * STRIDE + col, kw_rows + key * ROW_WORDS + col);
      flashmoe_copy_async<4>(stage + (16 + row) * STRIDE + col, vw_rows + key * ROW_WORDS + col);
    }
    UNROLL for (uint32_t e0 = 0; e0 < SCALE_WORDS; e0 += 32) {
      const uint32_t e = e0 + LANE, key = c0 + e / (NG / 2) < n1 ? c0 + e / (NG / 2) : n1 - 1;
      if (e < SCALE_WORDS) {
        UNROLL for (uint32_t a = 0; a < 4; ++a)
          flashmoe_copy_async<1>(stage + 32 * STRIDE + a * SCALE_WORDS + e, scale_rows[a] + key * (NG / 2) + e % (NG / 2));
      }
    }
  }
  flashmoe_copy_commit();  // empty past the last tile: every iteration waits on the same count
};
// A tile in registers. Scores: keys g (half 0) and 8 + g (half 1). Key scales and biases, and values: keys
// 8 * half + 2 c + k (k = 0, 1), whose scores this lane holds.
struct Tile {
  uint32_t kw[2][NG * KC];
  uint32_t ks[2][2][NG / 2], kb[2][2][NG / 2];  // [half][k][words of NG bfloat16]
  uint32_t vw[2][2][NG * VC];
  uint32_t vs[2][2][NG / 2], vb[2][2][NG / 2];
};
const auto read = [&](const uint32_t* stage, Tile& tile) {
  UNROLL for (uint32_t half = 0; half < 2; ++half) {
    UNROLL for (uint32_t grp = 0; grp < NG; ++grp)
      flashmoe_load_words<KC, KALIGN>(stage + (8 * half + g) * STRIDE + grp * GW + c * KC, tile.kw[half] + grp * KC);
    UNROLL for (uint32_t k = 0; k < 2; ++k) {
      const uint32_t key = 8 * half + 2 * c + k;
      UNROLL for (uint32_t grp = 0; grp < NG; ++grp)
        flashmoe_load_words<VC, VALIGN>(stage + (16 + key) * STRIDE + grp * GW + g * VC, tile.vw[half][k] + grp * VC);
      UNROLL for (uint32_t i = 0; i < NG / 2; ++i) {
        const uint32_t* scales = stage + 32 * STRIDE + key * (NG / 2) + i;
        tile.ks[half][k][i] = scales[0];
        tile.kb[half][k][i] = scales[SCALE_WORDS];
        tile.vs[half][k][i] = scales[2 * SCALE_WORDS];
        tile.vb[half][k][i] = scales[3 * SCALE_WORDS];
      }
    }
  }
};
// The first tiles' copies go out first: their latency overlaps the rest of the set-up.
UNROLL for (uint32_t t = 0; t + 1 < STAGES; ++t) issue(t);
// q as the scores' A fragments (bfloat16 bits: exact), all its loads issued at once. Lane (lg, lc) in k-step
// 2 j + half: register r holds head lg + 8 (r % 2), dims d + r / 2 and d + r / 2 + 4 of word w = d / 8.
constexpr uint32_t Q_ENTRIES = (KSTEPS * 32 + 32 * WARPS - 1) / (32 * WARPS);  // (k-step, lane) per thread
uint32_t q_lo[Q_ENTRIES][4], q_hi[Q_ENTRIES][4];
UNROLL for (uint32_t i = 0; i < Q_ENTRIES; ++i) {
  const uint32_t e = tid + i * 32 * WARPS, step = e / 32, lane = e % 32, j = step / 2;
  const uint32_t d = 8 * (j / KC * GW + lane % 4 * KC + j % KC) + 2 * (step % 2);
  UNROLL for (uint32_t r = 0; r < 4; ++r) {
    const uint32_t head = lane / 4 + 8 * (r % 2);
    const DEVICE T* at = q_kv + head * q_strides[1] + (d + r / 2) * q_strides[3];
    const bool real = e < KSTEPS * 32 && head < G;
    q_lo[i][r] = real ? uint32_t(BF16_BITS(at[0])) : 0u;
    q_hi[i][r] = real ? uint32_t(BF16_BITS(at[4 * q_strides[3]])) : 0u;
  }
}
UNROLL for (uint32_t i = 0; i < Q_ENTRIES; ++i) {
  const uint32_t e = tid + i * 32 * WARPS;
  if (e < KSTEPS * 32) {
    UNROLL for (uint32_t r = 0; r < 4; ++r) qa[e * 4 + r] = q_lo[i][r] | q_hi[i][r] << 16;
  }
}
BARRIER();
// q summed over each group for heads g and g + 8, by MMAs against ones: C's column 0 of rows g and g + 8.
float qs[2][NG];
UNROLL for (uint32_t grp = 0; grp < NG; ++grp) {
  const uint32_t ones[2] = {0x3F803F80u, 0x3F803F80u};
  float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  UNROLL for (uint32_t step = 2 * grp * KC; step < 2 * (grp + 1) * KC; ++step) {
    uint32_t a[4];
    flashmoe_load4(qa + (step * 32 + LANE) * 4, a);
    flashmoe_mma_bf16(sum, a, ones);
  }
  qs[0][grp] = sum[0];
  qs[1][grp] = sum[2];
}
const auto group_of = [](const uint32_t* words, uint32_t grp) { return flashmoe_bf16_float(words[grp / 2] >> 16 * (grp % 2)); };
// m: running max of heads g, g + 8; l, bsum: this lane's share of their softmax sum and of sum P * V bias.
float m[2] = {LOWEST, LOWEST}, l[2] = {0.0f, 0.0f}, bsum[2][NG];
float acc[HB][KSTEPS][4];  // O^T: [head block][16 dims][C fragment: dims g, g + 8 x heads 2c, 2c + 1]
float corr[HB][NG][4];     // 128 * sum P' per (head, group) in the same layout: V's 128 + q, taken off at the end
UNROLL for (uint32_t row = 0; row < 2; ++row) {
  UNROLL for (uint32_t grp = 0; grp < NG; ++grp) bsum[row][grp] = 0.0f;
}
UNROLL for (uint32_t hb = 0; hb < HB; ++hb) {
  UNROLL for (uint32_t mt = 0; mt < KSTEPS; ++mt) {
    UNROLL for (uint32_t r = 0; r < 4; ++r) acc[hb][mt][r] = 0.0f;
  }
  UNROLL for (uint32_t grp = 0; grp < NG; ++grp) {
    UNROLL for (uint32_t r = 0; r < 4; ++r) corr[hb][grp][r] = 0.0f;
  }
}
const uint32_t all_128[4] = {0x43004300u, 0x43004300u, 0x43004300u, 0x43004300u};
for (uint32_t t = 0; t < tiles; ++t) {
  issue(t + STAGES - 1);
  flashmoe_copy_wait<STAGES - 1>();  // this lane's copies of tile t have landed; the barrier: everyone's
  SIMD_BARRIER();
  Tile cur;
  read(ring + t % STAGES * STAGE, cur);
  SIMD_BARRIER();  // read before the next iteration's copies overwrite the stage
  const uint32_t c0 = n0 + 16 * t;
  // Scores: s[half][r] = head g + 8 (r / 2), key 8 half + 2 c + r % 2.
  float s[2][4];
  UNROLL for (uint32_t half = 0; half < 2; ++half) {
    UNROLL for (uint32_t r = 0; r < 4; ++r) s[half][r] = 0.0f;
  }
  UNROLL for (uint32_t grp = 0; grp < NG; ++grp) {
    float dot[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    UNROLL for (uint32_t i = 0; i < KC; ++i) {
      UNROLL for (uint32_t step = 0; step < 2; ++step) {
        uint32_t a[4];
        flashmoe_load4(qa + ((2 * (grp * KC + i) + step) * 32 + LANE) * 4, a);
        UNROLL for (uint32_t half = 0; half < 2; ++half) {
          const uint32_t w = cur.kw[half][grp * KC + i];
          const uint32_t bk[2] = {flashmoe_nibble_pair(w >> 8 * step), flashmoe_nibble_pair(w >> (8 * step + 4))};
          flashmoe_mma_bf16(dot[half], a, bk);
        }
      }
    }
    UNROLL for (uint32_t half = 0; half < 2; ++half) {
      UNROLL for (uint32_t r = 0; r < 4; ++r) {
        const float sc = group_of(cur.ks[half][r % 2], grp), bi = group_of(cur.kb[half][r % 2], grp);
        s[half][r] += sc * dot[half][r] + (bi - 128.0f * sc) * qs[r / 2][grp];
      }
    }
  }
  // Online softmax of heads g and g + 8 over the tile (its 16 keys sit in the lane's quad).
  float p[2][4], alpha[2];
  UNROLL for (uint32_t row = 0; row < 2; ++row) {
    float top = LOWEST;
    UNROLL for (uint32_t half = 0; half < 2; ++half) {
      UNROLL for (uint32_t k = 0; k < 2; ++k) {
        const bool valid = c0 + 8 * half + 2 * c + k < n1;
        s[half][2 * row + k] = valid ? s[half][2 * row + k] * qk_scale : LOWEST;
        top = top > s[half][2 * row + k] ? top : s[half][2 * row + k];
      }
    }
    top = fmaxf(top, SIMD_SHUFFLE(top, LANE ^ 1));
    top = fmaxf(top, SIMD_SHUFFLE(top, LANE ^ 2));
    const float m_new = m[row] > top ? m[row] : top;
    alpha[row] = EXP2(m[row] - m_new);
    m[row] = m_new;
    l[row] *= alpha[row];
    UNROLL for (uint32_t grp = 0; grp < NG; ++grp) bsum[row][grp] *= alpha[row];
    UNROLL for (uint32_t half = 0; half < 2; ++half) {
      UNROLL for (uint32_t k = 0; k < 2; ++k) {
        p[half][2 * row + k] = EXP2(s[half][2 * row + k] - m_new);
        l[row] += p[half][2 * row + k];
      }
    }
  }
  // O^T of head 8 hb + 2 c + e scales by that head's alpha, held by the lanes of quad 2 c + e; once the maxima
  // settle no head's changes, and the SIMD-group skips it.
  if (SIMD_ANY(alpha[0] != 1.0f || alpha[1] != 1.0f)) {
    UNROLL for (uint32_t hb = 0; hb < HB; ++hb) {
      UNROLL for (uint32_t e = 0; e < 2; ++e) {
        const float f = SIMD_SHUFFLE(alpha[hb], 8 * c + 4 * e);
        UNROLL for (uint32_t mt = 0; mt < KSTEPS; ++mt) {
          acc[hb][mt][e] *= f;
          acc[hb][mt][2 + e] *= f;
        }
        UNROLL for (uint32_t grp = 0; grp < NG; ++grp) corr[hb][grp][e] *= f;
      }
    }
  }
  // P^T's B fragments per group, V's scale folded in; V's bias term in float32; 128 * sum P' by one MMA.
  uint32_t pb[HB][NG][2];
  UNROLL for (uint32_t hb = 0; hb < HB; ++hb) {
    UNROLL for (uint32_t grp = 0; grp < NG; ++grp) {
      UNROLL for (uint32_t half = 0; half < 2; ++half) {
        pb[hb][grp][half] = flashmoe_bf16x2(p[half][2 * hb] * group_of(cur.vs[half][0], grp),
                                            p[half][2 * hb + 1] * group_of(cur.vs[half][1], grp));
        UNROLL for (uint32_t k = 0; k < 2; ++k) bsum[hb][grp] += p[half][2 * hb + k] * group_of(cur.vb[half][k], grp);
      }
      flashmoe_mma_bf16(corr[hb][grp], all_128, pb[hb][grp]);
    }
  }
  // Values: word i of group grp gives 16-dim tiles 4 (grp VC + i) + u, dims 2u and 2u + 1 of the word of each
  // lane row g (rows g and g + 8), over keys 2c, 2c + 1 (k-slots 2c, 2c + 1) and 8 + 2c, 9 + 2c (2c + 8, 2c + 9).
  UNROLL for (uint32_t grp = 0; grp < NG; ++grp) {
    UNROLL for (uint32_t i = 0; i < VC; ++i) {
      const uint32_t wi = grp * VC + i;
      uint32_t x[2][2];  // [half][word bytes 0-1, 2-3]: key 2c's two bytes, then key 2c + 1's
      UNROLL for (uint32_t half = 0; half < 2; ++half) {
        x[half][0] = flashmoe_byte_perm(cur.vw[half][0][wi], cur.vw[half][1][wi], 0x5410u);
        x[half][1] = flashmoe_byte_perm(cur.vw[half][0][wi], cur.vw[half][1][wi], 0x7632u);
      }
      UNROLL for (uint32_t u = 0; u < 4; ++u) {
        uint32_t a[4];
        UNROLL for (uint32_t r = 0; r < 4; ++r) a[r] = flashmoe_nibble_pair(x[r / 2][u / 2] >> (8 * (u % 2) + 4 * (r % 2)));
        UNROLL for (uint32_t hb = 0; hb < HB; ++hb) flashmoe_mma_bf16(acc[hb][4 * wi + u], a, pb[hb][grp]);
      }
    }
  }
}
flashmoe_copy_wait<0>();
// Merge: the quad's shares, then the SIMD-groups, with M = max of their maxima and each scaled by 2^(m - M).
UNROLL for (uint32_t row = 0; row < 2; ++row) {
  l[row] += SIMD_SHUFFLE(l[row], LANE ^ 1);
  l[row] += SIMD_SHUFFLE(l[row], LANE ^ 2);
  UNROLL for (uint32_t grp = 0; grp < NG; ++grp) {
    bsum[row][grp] += SIMD_SHUFFLE(bsum[row][grp], LANE ^ 1);
    bsum[row][grp] += SIMD_SHUFFLE(bsum[row][grp], LANE ^ 2);
  }
  if (c == 0 && g + 8 * row < G) {
    stats[SIMD_IN_TG * 32 + (g + 8 * row) * 2] = m[row];
    stats[SIMD_IN_TG * 32 + (g + 8 * row) * 2 + 1] = l[row];
  }
}
BARRIER();  // every SIMD-group is past its loop: the rings are free for the partial sums
float factor[HB][2], bias[HB][2][NG];  // for heads 8 hb + 2 c + e: this SIMD-group's 2^(m - M), its bias sums
UNROLL for (uint32_t hb = 0; hb < HB; ++hb) {
  UNROLL for (uint32_t e = 0; e < 2; ++e) {
    const uint32_t head = 8 * hb + 2 * c + e < G ? 8 * hb + 2 * c + e : 0;
    float top = LOWEST;
    for (uint32_t w = 0; w < WARPS; ++w) top = fmaxf(top, stats[w * 32 + head * 2]);
    factor[hb][e] = EXP2(stats[SIMD_IN_TG * 32 + head * 2] - top);
    UNROLL for (uint32_t grp = 0; grp < NG; ++grp) bias[hb][e][grp] = SIMD_SHUFFLE(bsum[hb][grp], 8 * c + 4 * e);
  }
}
float* mine = merged + SIMD_IN_TG * G * (D + 1);  // rows of D + 1: the lanes' stores spread over the banks
UNROLL for (uint32_t hb = 0; hb < HB; ++hb) {
  UNROLL for (uint32_t mt = 0; mt < KSTEPS; ++mt) {
    UNROLL for (uint32_t r = 0; r < 4; ++r) {
      const uint32_t head = 8 * hb + 2 * c + r % 2, wi = mt / 4, grp = wi / VC;
      const uint32_t d = 8 * (grp * GW + g * VC + wi % VC) + 2 * (mt % 4) + r / 2;
      const float v = factor[hb][r % 2] * (acc[hb][mt][r] - corr[hb][grp][r % 2] + bias[hb][r % 2][grp]);
      if (head < G) mine[head * (D + 1) + d] = v;
    }
  }
}
BARRIER();
const uint32_t out = (b * HQ + head0) * SPLITS + split;  // (batch, first query head, split)
for (uint32_t e = tid; e < G * D; e += 32 * WARPS) {
  float sum = 0.0f;
  UNROLL for (uint32_t w = 0; w < WARPS; ++w) sum += merged[(w * G + e / D) * (D + 1) + e % D];
  o[(out + e / D * SPLITS) * D + e % D] = sum;
}
for (uint32_t head = tid; head < G; head += 32 * WARPS) {
  float top = LOWEST, total = 0.0f;
  for (uint32_t w = 0; w < WARPS; ++w) top = fmaxf(top, stats[w * 32 + head * 2]);
  for (uint32_t w = 0; w < WARPS; ++w) total += EXP2(stats[w * 32 + head * 2] - top) * stats[w * 32 + head * 2 + 1];
  ml[(out + head * SPLITS) * 2] = top * 0.69314718f;  // the combine pass's base e
  ml[(out + head * SPLITS) * 2 + 1] = total;
}
