// attention_decode, pass 1 of 2: flash decoding of one query token over an MLX-affine quantized KV cache.
// One threadgroup per (batch, kv head, split of the keys); its WARPS SIMD-groups take consecutive chunks of
// CHUNK = 32 * KEYS_PER_LANE keys of the split and serve all G = HQ / HKV query heads of the kv head at once,
// so each K/V byte is read once for the whole GQA group.
// Scores: lane = keys c + LANE + 32 k (k < KEYS_PER_LANE) of chunk c, each K row in vector loads, dequantized
// once, G dot products against q held pre-scaled in threadgroup memory, 4 heads per 16-byte read, and each
// read serves the lane's KEYS_PER_LANE keys (reads of q per key divided by KEYS_PER_LANE).
// Online softmax per head across the SIMD-group: one SIMD max per head and chunk; each lane keeps its share
// of the sum, added up once at the end. Values: lane = D/32 consecutive dims, keys in turn, the chunk's
// softmax weights read from threadgroup memory. At the end the SIMD-groups merge their (max, sum, accumulator).
// Heads are padded to GP, a multiple of 4, with zero queries (their results are never written).
// Inputs: q [B, HQ, 1, D] (T); k_w, v_w [B, HKV, N, D*BITS/32] uint32; k_s, k_b, v_s, v_b [B, HKV, N, D/GS] (T).
// Every input is read through its strides: the cache arrays are views of a longer buffer (mlx-lm's caches slice
// theirs at the current length), which MLX would otherwise copy whole on each call. A key's row is whole and
// contiguous (a slice along the keys keeps it so).
// Outputs: o [B, HQ, SPLITS, D] float (unnormalised), ml [B, HQ, SPLITS, 2] float (max, sum).
// Template constants: T, HQ, HKV, D, BITS, GS, SPLITS, WARPS (threadgroup: 32 * WARPS), KEYS_PER_LANE (1 or
// 2: the second key's registers against half the q reads; the wrapper picks per shape), SCALE_BITS (the score
// scale's float32 bits: constant per model, and no small array to build and move per call). B, N: k_w's shape.
// Threadgroup memory, in floats: GP * (D + D/32) + WARPS * (CHUNK * GP + D + 2 * GP) (kernels.py counts it).
// Requires (D/32) * BITS to divide 32 or be a multiple of it, and D/32 to divide GS (the wrapper checks).
constexpr uint32_t G = HQ / HKV;
constexpr uint32_t G4 = (G + 3) / 4;                      // float4s per (dim or key) over the padded heads
constexpr uint32_t GP = 4 * G4;
constexpr uint32_t CHUNK = 32 * KEYS_PER_LANE;
constexpr uint32_t PACKS = D / 32;
constexpr uint32_t ROW_WORDS = D * BITS / 32;
constexpr uint32_t ROW_GROUPS = D / GS;
constexpr uint32_t DPL = D / 32;                          // value dims per lane
constexpr uint32_t LANE_BITS = DPL * BITS;                // their bits in a V row
constexpr uint32_t LANE_WORDS = LANE_BITS > 32 ? LANE_BITS / 32 : 1;
constexpr int ALIGN = flashmoe_pack_align(BITS, ROW_WORDS);
constexpr float LOWEST = -3.0e38f;
SHARED(float4, qs, D * G4);            // q * scale * prescale, [d][head / 4]
SHARED(float4, qsum, PACKS * G4);      // q * scale summed over each pack, [pack][head / 4]
SHARED(float4, chunk_w, WARPS * CHUNK * G4);  // per SIMD-group: the chunk's softmax weights, [key][head / 4]
SHARED(float, merge, WARPS * D);       // per SIMD-group: one head's accumulator at a time
SHARED(float, stats, WARPS * GP * 2);
const uint32_t N = k_w_shape[2];
const uint32_t split = TG % SPLITS;
const uint32_t kvh = (TG / SPLITS) % HKV;
const uint32_t b = TG / (SPLITS * HKV);
const uint32_t tid = SIMD_IN_TG * 32 + LANE;
const DEVICE T* q_kv = q + b * q_strides[0] + kvh * G * q_strides[1];  // this kv head's first query head
const DEVICE uint32_t* kw_rows = k_w + b * k_w_strides[0] + kvh * k_w_strides[1];  // key 0's rows
const DEVICE T* ks_rows = k_s + b * k_s_strides[0] + kvh * k_s_strides[1];
const DEVICE T* kb_rows = k_b + b * k_b_strides[0] + kvh * k_b_strides[1];
const DEVICE uint32_t* vw_rows = v_w + b * v_w_strides[0] + kvh * v_w_strides[1];
const DEVICE T* vs_rows = v_s + b * v_s_strides[0] + kvh * v_s_strides[1];
const DEVICE T* vb_rows = v_b + b * v_b_strides[0] + kvh * v_b_strides[1];
const float qk_scale = AS_FLOAT(uint32_t(SCALE_BITS));
for (uint32_t e = tid; e < D * G4; e += 32 * WARPS) {
  const uint32_t d = e / G4, h = e % G4 * 4;
  float v[4];
  UNROLL for (uint32_t k = 0; k < 4; ++k)
    v[k] = h + k < G ? float(q_kv[(h + k) * q_strides[1] + d * q_strides[3]]) * qk_scale
                           * flashmoe_prescale<BITS>(d % 32) : 0.0f;
  qs[e] = FLOAT4(v[0], v[1], v[2], v[3]);
}
BARRIER();
// Pack sums from the staged copy (undoing the prescale): no chain of global loads per thread.
for (uint32_t e = tid; e < PACKS * G4; e += 32 * WARPS) {
  const uint32_t p = e / G4, h4 = e % G4;
  float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (uint32_t i = 0; i < 32; ++i) {
    const float4 qv = qs[(p * 32 + i) * G4 + h4];
    const float unscale = 1.0f / flashmoe_prescale<BITS>(i);
    v[0] += qv.x * unscale;
    v[1] += qv.y * unscale;
    v[2] += qv.z * unscale;
    v[3] += qv.w * unscale;
  }
  qsum[e] = FLOAT4(v[0], v[1], v[2], v[3]);
}
BARRIER();
// Keys of this SIMD-group: its share of the split, whole chunks.
const uint32_t per_split = (N + SPLITS - 1) / SPLITS;
const uint32_t per_warp = ((per_split + WARPS - 1) / WARPS + CHUNK - 1) / CHUNK * CHUNK;
const uint32_t split_end = (split + 1) * per_split < N ? (split + 1) * per_split : N;
const uint32_t n0 = split * per_split + SIMD_IN_TG * per_warp;
const uint32_t n1 = n0 + per_warp < split_end ? n0 + per_warp : split_end;
const uint32_t mine = SIMD_IN_TG * CHUNK * G4;
float m[GP], l[GP], acc[GP][DPL];  // m: the SIMD-group's running max; l: this lane's share of the sum
UNROLL for (uint32_t h = 0; h < GP; ++h) {
  m[h] = LOWEST;
  l[h] = 0.0f;
  UNROLL for (uint32_t i = 0; i < DPL; ++i) acc[h][i] = 0.0f;
}
for (uint32_t c = n0; c < n1; c += CHUNK) {
  const uint32_t count = n1 - c < CHUNK ? n1 - c : CHUNK;  // keys in the chunk; lanes past them redo its last
  // Scores of keys c + LANE + 32 k for every head.
  uint32_t kw[KEYS_PER_LANE][ROW_WORDS];
  float ks[KEYS_PER_LANE][PACKS], kb[KEYS_PER_LANE][PACKS];
  UNROLL for (uint32_t k = 0; k < KEYS_PER_LANE; ++k) {
    const uint32_t krow = c + (32 * k + LANE < count ? 32 * k + LANE : count - 1);
    flashmoe_load_words<ROW_WORDS, ALIGN>(kw_rows + krow * ROW_WORDS, kw[k]);
    UNROLL for (uint32_t p = 0; p < PACKS; ++p) {
      ks[k][p] = float(ks_rows[krow * ROW_GROUPS + p * 32 / GS]);
      kb[k][p] = float(kb_rows[krow * ROW_GROUPS + p * 32 / GS]);
    }
  }
  // Key values come scaled (flashmoe_scaled_value), so a pack adds straight into the scores; its bias adds
  // kb * (q summed over the pack).
  float s[KEYS_PER_LANE][GP];
  UNROLL for (uint32_t k = 0; k < KEYS_PER_LANE; ++k) {
    UNROLL for (uint32_t h = 0; h < GP; ++h) s[k][h] = 0.0f;
  }
  UNROLL for (uint32_t p = 0; p < PACKS; ++p) {
    UNROLL for (int i = 0; i < 32; ++i) {
      float kv[KEYS_PER_LANE];
      UNROLL for (uint32_t k = 0; k < KEYS_PER_LANE; ++k)
        kv[k] = flashmoe_scaled_value<BITS>(kw[k] + p * BITS, i, ks[k][p], -8388608.0f * ks[k][p]);
      UNROLL for (uint32_t h4 = 0; h4 < G4; ++h4) {
        const float4 qv = qs[(p * 32 + i) * G4 + h4];
        UNROLL for (uint32_t k = 0; k < KEYS_PER_LANE; ++k) {
          s[k][4 * h4] += kv[k] * qv.x;
          s[k][4 * h4 + 1] += kv[k] * qv.y;
          s[k][4 * h4 + 2] += kv[k] * qv.z;
          s[k][4 * h4 + 3] += kv[k] * qv.w;
        }
      }
    }
    UNROLL for (uint32_t h4 = 0; h4 < G4; ++h4) {
      const float4 qv = qsum[p * G4 + h4];
      UNROLL for (uint32_t k = 0; k < KEYS_PER_LANE; ++k) {
        s[k][4 * h4] += kb[k][p] * qv.x;
        s[k][4 * h4 + 1] += kb[k][p] * qv.y;
        s[k][4 * h4 + 2] += kb[k][p] * qv.z;
        s[k][4 * h4 + 3] += kb[k][p] * qv.w;
      }
    }
  }
  // Online softmax per head; the chunk's weights (0 for masked keys) go to threadgroup memory for the values.
  float w[KEYS_PER_LANE][GP];
  UNROLL for (uint32_t h = 0; h < GP; ++h) {
    UNROLL for (uint32_t k = 0; k < KEYS_PER_LANE; ++k) w[k][h] = 0.0f;
    if (h < G) {
      float top = s[0][h];  // masked keys are copies of the chunk's last key: no change to its max
      UNROLL for (uint32_t k = 1; k < KEYS_PER_LANE; ++k) top = s[k][h] > top ? s[k][h] : top;
      top = SIMD_MAX(top);
      const float m_new = m[h] > top ? m[h] : top;
      const float rescale = EXP(m[h] - m_new);
      l[h] *= rescale;
      UNROLL for (uint32_t k = 0; k < KEYS_PER_LANE; ++k) {
        w[k][h] = 32 * k + LANE < count ? EXP(s[k][h] - m_new) : 0.0f;
        l[h] += w[k][h];
      }
      m[h] = m_new;
      UNROLL for (uint32_t i = 0; i < DPL; ++i) acc[h][i] *= rescale;
    }
  }
  UNROLL for (uint32_t k = 0; k < KEYS_PER_LANE; ++k) {
    UNROLL for (uint32_t h = 0; h < GP; h += 4)
      chunk_w[mine + (32 * k + LANE) * G4 + h / 4] = FLOAT4(w[k][h], w[k][h + 1], w[k][h + 2], w[k][h + 3]);
  }
  SIMD_BARRIER();
  // Values: dims [DPL * LANE, DPL * LANE + DPL) of the chunk's keys, 8 at a time (weight 0 past its end).
  const uint32_t group = DPL * LANE / GS;
  const uint32_t word = LANE_BITS * LANE / 32;
  const uint32_t shift = LANE_BITS < 32 ? LANE_BITS * LANE % 32 : 0;
  for (uint32_t j0 = 0; j0 < count; j0 += 8) {
    uint32_t vw[8][LANE_WORDS];
    float vs[8], vb[8];
    UNROLL for (uint32_t jj = 0; jj < 8; ++jj) {
      const uint32_t vrow = c + (j0 + jj < count ? j0 + jj : count - 1);
      UNROLL for (uint32_t k = 0; k < LANE_WORDS; ++k) vw[jj][k] = vw_rows[vrow * ROW_WORDS + word + k] >> shift;
      vs[jj] = float(vs_rows[vrow * ROW_GROUPS + group]);
      vb[jj] = float(vb_rows[vrow * ROW_GROUPS + group]);
    }
    UNROLL for (uint32_t jj = 0; jj < 8; ++jj) {
      float v[DPL];
      UNROLL for (uint32_t i = 0; i < DPL; ++i)
        v[i] = vs[jj] * flashmoe_prescale<BITS>(i) * flashmoe_value<BITS>(vw[jj], i) + vb[jj];
      UNROLL for (uint32_t h4 = 0; h4 < G4; ++h4) {
        const float4 wv = chunk_w[mine + (j0 + jj) * G4 + h4];
        UNROLL for (uint32_t i = 0; i < DPL; ++i) {
          acc[4 * h4][i] += wv.x * v[i];
          acc[4 * h4 + 1][i] += wv.y * v[i];
          acc[4 * h4 + 2][i] += wv.z * v[i];
          acc[4 * h4 + 3][i] += wv.w * v[i];
        }
      }
    }
  }
  SIMD_BARRIER();
}
// Merge the SIMD-groups: M = max of their maxima, each scaled by e^(m - M).
UNROLL for (uint32_t h = 0; h < G; ++h) l[h] = SIMD_SUM(l[h]);  // the lanes' shares: the SIMD-group's sum
if (LANE == 0) {
  UNROLL for (uint32_t h = 0; h < G; ++h) {
    stats[(SIMD_IN_TG * GP + h) * 2] = m[h];
    stats[(SIMD_IN_TG * GP + h) * 2 + 1] = l[h];
  }
}
BARRIER();
const uint32_t out = (b * HQ + kvh * G) * SPLITS + split;  // (batch, first query head, split)
UNROLL for (uint32_t h = 0; h < G; ++h) {
  float top = LOWEST;
  for (uint32_t w = 0; w < WARPS; ++w) top = top > stats[(w * GP + h) * 2] ? top : stats[(w * GP + h) * 2];
  if (tid == 0) {
    float total = 0.0f;
    for (uint32_t w = 0; w < WARPS; ++w) total += EXP(stats[(w * GP + h) * 2] - top) * stats[(w * GP + h) * 2 + 1];
    ml[(out + h * SPLITS) * 2] = top;
    ml[(out + h * SPLITS) * 2 + 1] = total;
  }
  const float factor = EXP(m[h] - top);
  UNROLL for (uint32_t i = 0; i < DPL; ++i) merge[SIMD_IN_TG * D + DPL * LANE + i] = acc[h][i] * factor;
  BARRIER();
  for (uint32_t d = tid; d < D; d += 32 * WARPS) {
    float sum = 0.0f;
    for (uint32_t w = 0; w < WARPS; ++w) sum += merge[w * D + d];
    o[(out + h * SPLITS) * D + d] = sum;
  }
  BARRIER();
}
