// Dequantizing dot products over MLX affine-quantized rows, shared by the kernel bodies of every backend.
// MLX packs a row as one little-endian bit stream: value i occupies bits [i*BITS, (i+1)*BITS) of the
// uint32 words. 32 values ("a pack") fill exactly BITS words, and group sizes are multiples of 32, so a
// pack has one scale and one bias: w_i = scale * q_i + bias.
//
// A value becomes a float in two instructions and no int->float conversion (which GPUs issue at a
// fraction of the FMA rate): its bits are masked *in place* and OR-ed under the exponent of 2^23 in one
// (flashmoe_mask_or: a LOP3 on CUDA), and 2^23 is subtracted, which is exact. In place means the float is q_i * 2^a_i, with a_i = the field's bit offset,
// so the other operand of the dot product comes pre-multiplied by 2^-a_i (exact: a power of two).
// A field above bit 22 is read from the word shifted down by 16 (one shift per word, shared by its fields);
// a field that straddles two words (3/5/6/7 bits) is shifted into bit 0.

template <int BITS>
DEVICE_FN constexpr int flashmoe_value_shift(int i) {
  return (i * BITS) % 32 + BITS > 32 ? 0 : (i * BITS) % 32 + BITS <= 23 ? (i * BITS) % 32 : (i * BITS) % 32 - 16;
}

// 2^-a_i: what value i's partner in a dot product is multiplied by.
template <int BITS>
DEVICE_FN float flashmoe_prescale(int i) { return AS_FLOAT(uint32_t(127 - flashmoe_value_shift<BITS>(i)) << 23); }

// Value i of a pack as 2^23 + q_i * 2^a_i (exact): the float whose mantissa holds the field.
template <int BITS>
DEVICE_FN float flashmoe_biased_value(const THREAD uint32_t* words, int i) {
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  const int bit = i * BITS, word = bit / 32, shift = bit % 32;
  uint32_t source, mask;  // the field's bits are source & mask
  if (shift + BITS > 32) { source = (words[word] >> shift) | (words[word + 1] << (32 - shift)); mask = MASK; }
  else if (shift + BITS <= 23) { source = words[word]; mask = MASK << shift; }
  else { source = words[word] >> 16; mask = MASK << (shift - 16); }
  return AS_FLOAT(flashmoe_mask_or(source, mask, 0x4B000000u));
}

// Value i of a pack as q_i * 2^a_i.
template <int BITS>
DEVICE_FN float flashmoe_value(const THREAD uint32_t* words, int i) {
  return flashmoe_biased_value<BITS>(words, i) - 8388608.0f;
}

// scale * q_i * 2^a_i in as many instructions as flashmoe_value, given offset = -2^23 * scale (exact): one
// FMA, whose product is exact, so 2^23 * scale cancels before its single rounding. (A multiply then an add
// would round 2^23 * scale first and lose the field; hence FMA, never a * b + c left to the compiler.)
template <int BITS>
DEVICE_FN float flashmoe_scaled_value(const THREAD uint32_t* words, int i, float scale, float offset) {
  return FMA(flashmoe_biased_value<BITS>(words, i), scale, offset);
}

// sum_i q_i * x_i over one pack, with xs[i] = x_i * flashmoe_prescale<BITS>(i).
template <int BITS>
DEVICE_FN float flashmoe_pack_dot(const THREAD uint32_t* words, const THREAD float* xs) {
  float acc = 0.0f;
  UNROLL for (int i = 0; i < 32; ++i) acc += flashmoe_value<BITS>(words, i) * xs[i];
  return acc;
}

// N words into registers, in 16- or 8-byte loads where the words are that aligned (ALIGN: 4, 2 or 1 words).
template <int N, int ALIGN>
DEVICE_FN void flashmoe_load_words(const DEVICE uint32_t* src, THREAD uint32_t* dst) {
  if (ALIGN == 4) { UNROLL for (int i = 0; i < N; i += 4) flashmoe_load4(src + i, dst + i); }
  else if (ALIGN == 2) { UNROLL for (int i = 0; i < N; i += 2) flashmoe_load2(src + i, dst + i); }
  else { UNROLL for (int i = 0; i < N; ++i) dst[i] = src[i]; }
}

// Pack p of ROWS rows: its words (words[r * BITS + k]) and the scale and bias of its group, as floats.
template <int BITS, int ROWS, int ALIGN, typename TS>
DEVICE_FN void flashmoe_load_pack(const DEVICE uint32_t* w, const DEVICE TS* s, const DEVICE TS* b,
                                  const THREAD uint32_t* rows, uint32_t row_words, uint32_t row_groups, uint32_t p,
                                  uint32_t group, THREAD uint32_t* words, THREAD float* scales, THREAD float* biases) {
  UNROLL for (int r = 0; r < ROWS; ++r) {
    flashmoe_load_words<BITS, ALIGN>(w + rows[r] * row_words + p * BITS, words + r * BITS);
    scales[r] = float(s[rows[r] * row_groups + group]);
    biases[r] = float(b[rows[r] * row_groups + group]);
  }
}

// The widest ALIGN for packs of BITS words at offsets that are multiples of BITS in rows of ROW_WORDS.
DEVICE_FN constexpr int flashmoe_pack_align(int bits, int row_words) {
  return bits % 4 == 0 && row_words % 4 == 0 ? 4 : bits % 2 == 0 && row_words % 2 == 0 ? 2 : 1;
}

DEVICE_FN float flashmoe_silu(float v) { return v / (1.0f + EXP(-v)); }

// The sums over a SIMD-group's 32 lanes of each lane's ROWS values (a power of two, <= 32), lane L ending with
// row L % ROWS's: each halving step trades half of the rows with the lane across one bit, then the remaining
// bits are summed over. ROWS - 1 + 5 - log2(ROWS) shuffles and as many adds, where a SIMD_SUM per row takes
// 5 ROWS of each (8 rows: 9 against 40). v is overwritten.
template <int ROWS>
DEVICE_FN float flashmoe_rows_sum(THREAD float* v, uint32_t lane) {
  static_assert(ROWS >= 1 && ROWS <= 32 && (ROWS & (ROWS - 1)) == 0, "ROWS: a power of two, at most 32");
  UNROLL for (int w = ROWS / 2; w >= 1; w /= 2) {
    const bool upper = (lane & uint32_t(w)) != 0;  // keeps rows w..2w-1 of its block, sends 0..w-1
    UNROLL for (int i = 0; i < w; ++i) {
      const float send = upper ? v[i] : v[i + w];
      v[i] = (upper ? v[i + w] : v[i]) + SIMD_SHUFFLE(send, lane ^ uint32_t(w));
    }
  }
  float sum = v[0];
  UNROLL for (int m = ROWS; m < 32; m *= 2) sum += SIMD_SHUFFLE(sum, lane ^ uint32_t(m));
  return sum;
}
