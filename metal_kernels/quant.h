// Dequantizing dot products over MLX affine-quantized rows, shared by the kernel bodies of every backend.
// MLX packs a row as one little-endian bit stream: value i occupies bits [i*BITS, (i+1)*BITS) of the
// uint32 words. 32 values ("a pack") fill exactly BITS words, and group sizes are multiples of 32, so a
// pack has one scale and one bias: w_i = scale * q_i + bias.

// q (< 2^23) as a float without an int->float conversion, which GPUs issue at a fraction of the FMA rate:
// the bits 0x4B000000 | q are the float 2^23 + q, and the subtraction is exact.
DEVICE_FN float flashmoe_q_to_float(uint32_t q) { return AS_FLOAT(0x4B000000u | q) - 8388608.0f; }

// sum_i w_i * xs[i] over one pack = scale * sum_i q_i xs[i] + bias * sum_i xs[i] (xsum precomputed).
template <int BITS>
DEVICE_FN float flashmoe_pack_dot(const DEVICE uint32_t* w, const THREAD float* xs, float scale, float bias, float xsum) {
  uint32_t words[BITS];
  for (int k = 0; k < BITS; ++k) words[k] = w[k];
  float acc = 0.0f;
  for (int i = 0; i < 32; ++i) {
    const int bit = i * BITS, word = bit / 32, shift = bit % 32;
    uint32_t v = words[word] >> shift;
    if (shift + BITS > 32) v |= words[word + 1] << (32 - shift);
    acc += flashmoe_q_to_float(v & ((1u << BITS) - 1u)) * xs[i];
  }
  return scale * acc + bias * xsum;
}

DEVICE_FN float flashmoe_silu(float v) { return v / (1.0f + EXP(-v)); }
