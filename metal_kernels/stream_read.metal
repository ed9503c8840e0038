// stream_read: reads N words and keeps nothing but each threadgroup's XOR of them. Not part of the model: the
// benchmarks' bound, the fastest we found this card and MLX's launches read a given number of bytes, put next to
// what the kernels achieve on the same bytes (docs/BENCHMARKS.md). Each thread issues LOADS 16-byte loads
// before it uses any (a grid-stride walk: a step's loads of all threads cover one contiguous span), so a
// threadgroup keeps THREADS * LOADS * 16 bytes in flight.
// Inputs: words [N] uint32 (N % 4 == 0, 16-byte aligned). Output: out [GROUPS] uint32, threadgroup g's XOR of the
// words it read (their XOR over all g: the XOR of all words).
// Template constants: N, GROUPS (threadgroups), THREADS (per threadgroup), LOADS.
constexpr uint32_t CHUNKS = N / 4;  // 16-byte chunks
constexpr uint32_t STRIDE = GROUPS * THREADS;
SHARED(uint32_t, thread_words, THREADS);
const uint32_t tid = SIMD_IN_TG * 32 + LANE;
uint32_t acc = 0;
for (uint32_t c = TG * THREADS + tid; c < CHUNKS; c += LOADS * STRIDE) {
  uint32_t w[LOADS][4];
  UNROLL for (uint32_t u = 0; u < LOADS; ++u) {
    if (c + u * STRIDE < CHUNKS) flashmoe_load4(words + 4 * size_t(c + u * STRIDE), w[u]);
    else w[u][0] = w[u][1] = w[u][2] = w[u][3] = 0u;
  }
  UNROLL for (uint32_t u = 0; u < LOADS; ++u) acc ^= w[u][0] ^ w[u][1] ^ w[u][2] ^ w[u][3];
}
thread_words[tid] = acc;
BARRIER();
if (tid == 0) {
  uint32_t x = 0;
  for (uint32_t i = 0; i < THREADS; ++i) x ^= thread_words[i];
  out[TG] = x;
}
