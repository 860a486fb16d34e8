// Native CPU kernels for llamaforge: dot products over GGUF Q4_0 / Q4_1 / Q8_0 blocks as they are stored
// (ggml-quants.c layouts), with the activation quantized to 8 bits per block of 32 as llama.cpp does
// (ggml-cpu `quantize_row_q8_0` / `q8_1`), and one fused one-token decode step for a whole LLaMA model.
//
// Dot products run on AVX-512 VNNI (vpdpbusd), AVX2 or plain C, picked at run time from CPU flags.
// Block layouts (bytes): Q8_0 = f16 d, int8 q[32]; Q4_0 = f16 d, 16 bytes (q_j = lo nibble of byte j,
// q_{j+16} = hi nibble), w = (q - 8) d; Q4_1 = f16 d, f16 m, 16 bytes, w = q d + m. F32 rows are plain.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace {

enum QType { F32 = 0, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };  // ggml type ids

inline int block_bytes(int t) { return t == Q4_0 ? 18 : t == Q4_1 ? 20 : t == Q8_0 ? 34 : 0; }

inline float fp16_to_fp32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) { bits = sign; }
    else {  // subnormal: renormalize
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; exp--; }
      bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) { bits = sign | 0x7f800000 | (man << 13); }
  else { bits = sign | ((exp + 127 - 15) << 23) | (man << 13); }
  float f; std::memcpy(&f, &bits, 4); return f;
}

inline float rd16(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return fp16_to_fp32(h); }

// One activation row quantized per block of 32: q (int8), d (scale), s = d * sum(q) (for the offsets).
struct QRow { std::vector<int8_t> q; std::vector<float> d, s; };

void quantize_row(const float* x, int K, QRow& r) {
  int nb = K / 32;
  r.q.resize(K); r.d.resize(nb); r.s.resize(nb);
  for (int b = 0; b < nb; b++) {
    const float* xb = x + b * 32;
    float amax = 0;
    for (int j = 0; j < 32; j++) amax = std::max(amax, std::fabs(xb[j]));
    float d = amax / 127.f, id = d ? 1.f / d : 0.f;
    int sum = 0;
    for (int j = 0; j < 32; j++) {
      int v = (int)std::nearbyint(xb[j] * id);
      r.q[b * 32 + j] = (int8_t)v; sum += v;
    }
    r.d[b] = d; r.s[b] = d * sum;
  }
}

// ---- dot products: weight row (blocks) . quantized activation row ----

float dot_q4_0_ref(const uint8_t* w, const QRow& x, int nb) {
  float acc = 0;
  for (int b = 0; b < nb; b++, w += 18) {
    const int8_t* xq = x.q.data() + b * 32;
    int s = 0;
    for (int j = 0; j < 16; j++) s += (w[2 + j] & 15) * xq[j] + (w[2 + j] >> 4) * xq[j + 16];
    float d = rd16(w);
    acc += d * (x.d[b] * s - 8 * x.s[b]);
  }
  return acc;
}

float dot_q4_1_ref(const uint8_t* w, const QRow& x, int nb) {
  float acc = 0;
  for (int b = 0; b < nb; b++, w += 20) {
    const int8_t* xq = x.q.data() + b * 32;
    int s = 0;
    for (int j = 0; j < 16; j++) s += (w[4 + j] & 15) * xq[j] + (w[4 + j] >> 4) * xq[j + 16];
    acc += rd16(w) * x.d[b] * s + rd16(w + 2) * x.s[b];
  }
  return acc;
}

float dot_q8_0_ref(const uint8_t* w, const QRow& x, int nb) {
  float acc = 0;
  for (int b = 0; b < nb; b++, w += 34) {
    const int8_t* xq = x.q.data() + b * 32;
    const int8_t* wq = (const int8_t*)(w + 2);
    int s = 0;
    for (int j = 0; j < 32; j++) s += wq[j] * xq[j];
    acc += rd16(w) * x.d[b] * s;
  }
  return acc;
}

float dot_f32_ref(const float* w, const float* x, int K) {
  float acc = 0;
  for (int k = 0; k < K; k++) acc += w[k] * x[k];
  return acc;
}

// AVX2: 32 products per block with maddubs (u8 x s8 -> s16 pairs) then madd to s32.
__attribute__((target("avx2,fma,f16c")))
inline __m256i nibbles32(const uint8_t* p) {
  __m128i b = _mm_loadu_si128((const __m128i*)p);
  __m256i v = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
  return _mm256_and_si256(v, _mm256_set1_epi8(15));  // bytes 0..15 low nibbles, 16..31 high nibbles
}

__attribute__((target("avx2,fma,f16c")))
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma,f16c")))
inline __m256i udot_avx2(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
inline __m256i udot_vnni(__m256i u, __m256i s) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
}

// Each block's int32x8 partial dot products are scaled into an accumulator, its offset term into a corr sum.
// Even and odd blocks go to two accumulator pairs: one fmadd chain (4 cycles a block) would bound the loop.
#define DEFINE_SIMD_DOTS(SUFFIX, TARGET, UDOT)                                                         \
  /* R activation rows against one weight row, each block unpacked once; accumulators in registers     \
     (R is a constant). A row's result does not depend on R: one-row dots are R = 1 (bit-identical).  */ \
  template <int R> TARGET inline void q4_tile_##SUFFIX(const uint8_t* w, const QRow* xs, int nb, int hdr, bool min, float* out, int64_t ldo) { \
    int bb = hdr + 16;                                                                               \
    __m256 a0[R], a1[R]; float c0[R], c1[R];                                                         \
    for (int m = 0; m < R; m++) { a0[m] = a1[m] = _mm256_setzero_ps(); c0[m] = c1[m] = 0; }          \
    int b = 0;                                                                                       \
    for (; b + 1 < nb; b += 2, w += 2 * bb) {                                                        \
      float d0 = _cvtsh_ss(*(const uint16_t*)w), f0 = min ? _cvtsh_ss(*(const uint16_t*)(w + 2)) : d0; \
      float d1 = _cvtsh_ss(*(const uint16_t*)(w + bb)), f1 = min ? _cvtsh_ss(*(const uint16_t*)(w + bb + 2)) : d1; \
      __m256i u0 = nibbles32(w + hdr), u1 = nibbles32(w + bb + hdr);                                 \
      for (int m = 0; m < R; m++) {                                                                  \
        const QRow& x = xs[m];                                                                       \
        __m256i s0 = UDOT(u0, _mm256_loadu_si256((const __m256i*)(x.q.data() + b * 32)));            \
        __m256i s1 = UDOT(u1, _mm256_loadu_si256((const __m256i*)(x.q.data() + b * 32 + 32)));       \
        a0[m] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * x.d[b]), _mm256_cvtepi32_ps(s0), a0[m]);         \
        a1[m] = _mm256_fmadd_ps(_mm256_set1_ps(d1 * x.d[b + 1]), _mm256_cvtepi32_ps(s1), a1[m]);     \
        c0[m] += f0 * x.s[b];                                                                        \
        c1[m] += f1 * x.s[b + 1];                                                                    \
      }                                                                                              \
    }                                                                                                \
    if (b < nb) {                                                                                    \
      float d0 = _cvtsh_ss(*(const uint16_t*)w), f0 = min ? _cvtsh_ss(*(const uint16_t*)(w + 2)) : d0; \
      __m256i u0 = nibbles32(w + hdr);                                                               \
      for (int m = 0; m < R; m++) {                                                                  \
        const QRow& x = xs[m];                                                                       \
        __m256i s0 = UDOT(u0, _mm256_loadu_si256((const __m256i*)(x.q.data() + b * 32)));            \
        a0[m] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * x.d[b]), _mm256_cvtepi32_ps(s0), a0[m]);         \
        c0[m] += f0 * x.s[b];                                                                        \
      }                                                                                              \
    }                                                                                                \
    for (int m = 0; m < R; m++) {                                                                    \
      float r = hsum8(_mm256_add_ps(a0[m], a1[m])), cc = c0[m] + c1[m];                              \
      out[m * ldo] = min ? r + cc : r - 8 * cc;                                                      \
    }                                                                                                \
  }                                                                                                  \
  TARGET void q4_dots_##SUFFIX(const uint8_t* w, const QRow* xs, int M, int nb, int hdr, bool min, float* out, int64_t ldo) { \
    int m = 0;                                                                                       \
    for (; m + 4 <= M; m += 4) q4_tile_##SUFFIX<4>(w, xs + m, nb, hdr, min, out + m * ldo, ldo);     \
    switch (M - m) {                                                                                 \
      case 3: q4_tile_##SUFFIX<3>(w, xs + m, nb, hdr, min, out + m * ldo, ldo); break;               \
      case 2: q4_tile_##SUFFIX<2>(w, xs + m, nb, hdr, min, out + m * ldo, ldo); break;               \
      case 1: q4_tile_##SUFFIX<1>(w, xs + m, nb, hdr, min, out + m * ldo, ldo); break;               \
    }                                                                                                \
  }                                                                                                  \
  template <int R> TARGET inline void q8_tile_##SUFFIX(const uint8_t* w, const QRow* xs, int nb, float* out, int64_t ldo) { \
    __m256 a0[R], a1[R];                                                                             \
    for (int m = 0; m < R; m++) a0[m] = a1[m] = _mm256_setzero_ps();                                 \
    int b = 0;                                                                                       \
    for (; b + 1 < nb; b += 2, w += 68) {                                                            \
      float d0 = _cvtsh_ss(*(const uint16_t*)w), d1 = _cvtsh_ss(*(const uint16_t*)(w + 34));        \
      __m256i w0 = _mm256_loadu_si256((const __m256i*)(w + 2)), w1 = _mm256_loadu_si256((const __m256i*)(w + 36)); \
      __m256i aw0 = _mm256_sign_epi8(w0, w0), aw1 = _mm256_sign_epi8(w1, w1);                        \
      for (int m = 0; m < R; m++) {                                                                  \
        const QRow& x = xs[m];                                                                       \
        __m256i x0 = _mm256_loadu_si256((const __m256i*)(x.q.data() + b * 32));                     \
        __m256i x1 = _mm256_loadu_si256((const __m256i*)(x.q.data() + b * 32 + 32));                \
        a0[m] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * x.d[b]), _mm256_cvtepi32_ps(UDOT(aw0, _mm256_sign_epi8(x0, w0))), a0[m]); \
        a1[m] = _mm256_fmadd_ps(_mm256_set1_ps(d1 * x.d[b + 1]), _mm256_cvtepi32_ps(UDOT(aw1, _mm256_sign_epi8(x1, w1))), a1[m]); \
      }                                                                                              \
    }                                                                                                \
    if (b < nb) {                                                                                    \
      float d0 = _cvtsh_ss(*(const uint16_t*)w);                                                     \
      __m256i w0 = _mm256_loadu_si256((const __m256i*)(w + 2)), aw0 = _mm256_sign_epi8(w0, w0);      \
      for (int m = 0; m < R; m++) {                                                                  \
        __m256i x0 = _mm256_loadu_si256((const __m256i*)(xs[m].q.data() + b * 32));                 \
        a0[m] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * xs[m].d[b]), _mm256_cvtepi32_ps(UDOT(aw0, _mm256_sign_epi8(x0, w0))), a0[m]); \
      }                                                                                              \
    }                                                                                                \
    for (int m = 0; m < R; m++) out[m * ldo] = hsum8(_mm256_add_ps(a0[m], a1[m]));                   \
  }                                                                                                  \
  TARGET void q8_dots_##SUFFIX(const uint8_t* w, const QRow* xs, int M, int nb, float* out, int64_t ldo) { \
    int m = 0;                                                                                       \
    for (; m + 4 <= M; m += 4) q8_tile_##SUFFIX<4>(w, xs + m, nb, out + m * ldo, ldo);               \
    switch (M - m) {                                                                                 \
      case 3: q8_tile_##SUFFIX<3>(w, xs + m, nb, out + m * ldo, ldo); break;                         \
      case 2: q8_tile_##SUFFIX<2>(w, xs + m, nb, out + m * ldo, ldo); break;                         \
      case 1: q8_tile_##SUFFIX<1>(w, xs + m, nb, out + m * ldo, ldo); break;                         \
    }                                                                                                \
  }                                                                                                  \
  /* one activation row: the tiles at R = 1 (one arithmetic for decode and verify rows) */         \
  TARGET float dot_q4_0_##SUFFIX(const uint8_t* w, const QRow& x, int nb) { float r; q4_tile_##SUFFIX<1>(w, &x, nb, 2, false, &r, 1); return r; } \
  TARGET float dot_q4_1_##SUFFIX(const uint8_t* w, const QRow& x, int nb) { float r; q4_tile_##SUFFIX<1>(w, &x, nb, 4, true, &r, 1); return r; }  \
  TARGET float dot_q8_0_##SUFFIX(const uint8_t* w, const QRow& x, int nb) { float r; q8_tile_##SUFFIX<1>(w, &x, nb, &r, 1); return r; } \
  TARGET float dot_f32_##SUFFIX(const float* w, const float* x, int K) {                              \
    __m256 acc = _mm256_setzero_ps(); int k = 0;                                                    \
    for (; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), acc); \
    float r = hsum8(acc);                                                                            \
    for (; k < K; k++) r += w[k] * x[k];                                                             \
    return r;                                                                                        \
  }

DEFINE_SIMD_DOTS(avx2, __attribute__((target("avx2,fma,f16c"))), udot_avx2)
DEFINE_SIMD_DOTS(vnni, __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"))), udot_vnni)

// ---- attention over one chunk of cached keys, for the `rep` query heads that share a kv head ----
// Unnormalized (flash-decoding): mx[r] = max score, l[r] = sum exp(score - mx[r]), o[r] = sum exp(...) v.
// Masked slots (keep[s] false) count exactly zero. sc: scratch of rep * (s1 - s0) floats.
void attn_chunk_ref(const float* K, const float* V, int hd, const float* q, int rep, float scale, const bool* keep,
                    int64_t s0, int64_t s1, float* mx, float* l, float* o, float* sc) {
  int64_t n = s1 - s0;
  for (int r = 0; r < rep; r++) {
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
      int64_t s = s0 + i;
      float v = -INFINITY;
      if (!keep || keep[s]) { v = 0; for (int j = 0; j < hd; j++) v += K[s * hd + j] * q[r * hd + j]; v *= scale; }
      sc[r * n + i] = v; m = std::max(m, v);
    }
    float sum = 0;
    for (int64_t i = 0; i < n; i++) { float e = sc[r * n + i] == -INFINITY ? 0.f : std::exp(sc[r * n + i] - m); sc[r * n + i] = e; sum += e; }
    mx[r] = m; l[r] = sum;
    for (int j = 0; j < hd; j++) o[r * hd + j] = 0;
    for (int64_t i = 0; i < n; i++) {
      float e = sc[r * n + i];
      if (e != 0.f) for (int j = 0; j < hd; j++) o[r * hd + j] += e * V[(s0 + i) * hd + j];
    }
  }
}

// exp on 8 lanes (Cephes' polynomial, as avx_mathfun): relative error ~1e-7 over the softmax's range
__attribute__((target("avx2,fma,f16c")))
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// AVX2 (head_dim a multiple of 8): each key and value row is read once for all `rep` heads
__attribute__((target("avx2,fma,f16c")))
void attn_chunk_avx2(const float* K, const float* V, int hd, const float* q, int rep, float scale, const bool* keep,
                     int64_t s0, int64_t s1, float* mx, float* l, float* o, float* sc) {
  int64_t n = s1 - s0;
  int nv = hd / 8;
  for (int64_t i = 0; i < n; i++) {
    int64_t s = s0 + i;
    if (keep && !keep[s]) { for (int r = 0; r < rep; r++) sc[r * n + i] = -INFINITY; continue; }
    const float* k = K + s * hd;
    for (int r = 0; r < rep; r++) {
      const float* qr = q + r * hd;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int j = 0;
      for (; j + 1 < nv; j += 2) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(k + 8 * j), _mm256_loadu_ps(qr + 8 * j), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(k + 8 * j + 8), _mm256_loadu_ps(qr + 8 * j + 8), a1);
      }
      if (j < nv) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(k + 8 * j), _mm256_loadu_ps(qr + 8 * j), a0);
      sc[r * n + i] = hsum8(_mm256_add_ps(a0, a1)) * scale;
    }
  }
  for (int r = 0; r < rep; r++) {
    float* sr = sc + r * n;
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++) m = std::max(m, sr[i]);
    mx[r] = m;
    __m256 vm = _mm256_set1_ps(m == -INFINITY ? 0.f : m), acc = _mm256_setzero_ps(), ninf = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      __m256 v = _mm256_loadu_ps(sr + i);
      __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(v, ninf, _CMP_EQ_OQ), exp8(_mm256_sub_ps(v, vm)));  // masked: 0
      _mm256_storeu_ps(sr + i, e); acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum8(acc);
    for (; i < n; i++) { float e = sr[i] == -INFINITY ? 0.f : std::exp(sr[i] - m); sr[i] = e; sum += e; }
    l[r] = sum;
  }
  for (int r = 0; r < rep * hd; r += 8) _mm256_storeu_ps(o + r, _mm256_setzero_ps());
  for (int64_t i = 0; i < n; i++) {
    const float* v = V + (s0 + i) * hd;
    for (int r = 0; r < rep; r++) {
      float e = sc[r * n + i];
      if (e == 0.f) continue;
      __m256 ve = _mm256_set1_ps(e);
      float* orow = o + r * hd;
      for (int j = 0; j < nv; j++) _mm256_storeu_ps(orow + 8 * j, _mm256_fmadd_ps(ve, _mm256_loadu_ps(v + 8 * j), _mm256_loadu_ps(orow + 8 * j)));
    }
  }
}

// maddubs saturates at 2 x 127 x 255 only for Q8_0's |w| x x products of 127 x 127 x 2 = 32258 < 32767: safe.

struct Dots {
  float (*q4_0)(const uint8_t*, const QRow&, int);
  float (*q4_1)(const uint8_t*, const QRow&, int);
  float (*q8_0)(const uint8_t*, const QRow&, int);
  float (*f32)(const float*, const float*, int);
  const char* name;
  // several activation rows against one weight row (the weight's blocks unpacked once), or null: one row at a time
  void (*q4m)(const uint8_t*, const QRow*, int, int, int, bool, float*, int64_t);
  void (*q8m)(const uint8_t*, const QRow*, int, int, float*, int64_t);
  void (*attn)(const float*, const float*, int, const float*, int, float, const bool*, int64_t, int64_t, float*, float*, float*, float*);
};

Dots pick_dots() {
  const char* force = std::getenv("LLAMAFORGE_NATIVE_ISA");  // tests: force a narrower path
  std::string f = force ? force : "";
  __builtin_cpu_init();
  bool vnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (vnni && (f.empty() || f == "vnni")) return {dot_q4_0_vnni, dot_q4_1_vnni, dot_q8_0_vnni, dot_f32_vnni, "avx512vnni", q4_dots_vnni, q8_dots_vnni, attn_chunk_avx2};
  if (avx2 && (f.empty() || f == "vnni" || f == "avx2")) return {dot_q4_0_avx2, dot_q4_1_avx2, dot_q8_0_avx2, dot_f32_avx2, "avx2", q4_dots_avx2, q8_dots_avx2, attn_chunk_avx2};
  return {dot_q4_0_ref, dot_q4_1_ref, dot_q8_0_ref, dot_f32_ref, "c", nullptr, nullptr, attn_chunk_ref};
}

const Dots& dots() { static Dots d = pick_dots(); return d; }

// ---- a thread pool whose workers spin while a decode step runs (ggml's approach) ----
// A step makes ~250 parallel regions of 10-100 us each. OpenMP (at::parallel_for) parks its threads on a
// futex between regions, and waking them costs about as much as the work, so a second thread gained
// nothing (37 tok/s at 1 and at 2 threads). Here the workers spin on a generation counter during a step
// (region cost < 1 us) and sleep between steps.
class Pool {
 public:
  ~Pool() {
    { std::lock_guard<std::mutex> lk(mu_); stop_ = true; }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  // Workers spin from begin() to end() (one step); n threads in all, the caller included.
  void begin(int n) {
    n = std::max(1, std::min(n, 64));
    while ((int)workers_.size() < n - 1) {
      int idx = (int)workers_.size() + 1;
      uint64_t g = gen_.load();  // the generation it has seen: read here, before any run() can move it
      workers_.emplace_back([this, idx, g] { loop(idx, g); });
    }
    nth_ = n;
    { std::lock_guard<std::mutex> lk(mu_); spinning_.store(true); }
    cv_.notify_all();
  }
  void end() { spinning_.store(false); }
  int threads() const { return nth_; }
  // fn(t, nth) on every thread t in [0, nth); returns when all are done.
  void run(const std::function<void(int, int)>& fn) {
    if (nth_ <= 1) { fn(0, 1); return; }
    task_ = &fn;
    pending_.store(nth_ - 1, std::memory_order_relaxed);
    if (spinning_.load()) gen_.fetch_add(1, std::memory_order_release);
    else { { std::lock_guard<std::mutex> lk(mu_); gen_.fetch_add(1, std::memory_order_release); } cv_.notify_all(); }
    fn(0, nth_);
    while (pending_.load(std::memory_order_acquire)) _mm_pause();
  }

 private:
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> spinning_{false};
  const std::function<void(int, int)>* task_ = nullptr;
  int nth_ = 1;
  bool stop_ = false;
  std::mutex mu_;
  std::condition_variable cv_;

  void loop(int idx, uint64_t seen) {
    for (;;) {
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen) {
        if (spinning_.load(std::memory_order_relaxed) || ++spins < 20000) { _mm_pause(); continue; }
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || spinning_.load() || gen_.load() != seen; });
        if (stop_) return;
        spins = 0;
      }
      seen = gen_.load(std::memory_order_acquire);
      if (idx < nth_) (*task_)(idx, nth_);
      if (idx < nth_) pending_.fetch_sub(1, std::memory_order_release);
    }
  }
};

Pool& pool() { static Pool p; return p; }
std::mutex& pool_mutex() { static std::mutex m; return m; }

// The pool for one step (or one op): spinning workers while it lives, one user at a time.
struct PoolScope {
  std::lock_guard<std::mutex> lk;
  explicit PoolScope(int n) : lk(pool_mutex()) { pool().begin(n); }
  ~PoolScope() { pool().end(); }
};

// Rows [0, N) in nth contiguous shares; share t of thread t.
inline void share(int64_t N, int t, int nth, int64_t& n0, int64_t& n1) {
  n0 = N * t / nth; n1 = N * (t + 1) / nth;
}

// ---- a weight: blocks (N, row bytes) uint8 or F32 (N, K) ----

struct Weight {
  torch::Tensor t;
  int type = F32, N = 0, K = 0;
  const uint8_t* data = nullptr;
  int64_t row_bytes = 0;
  Weight() {}
  Weight(torch::Tensor t_, int type_, int K_) : t(t_), type(type_), K(K_) {
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "native: weights must be contiguous CPU tensors");
    N = (int)t.size(0);
    if (type == F32) {
      TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.size(1) == K, "native: F32 weight must be (N, K) float32");
      row_bytes = (int64_t)K * 4;
    } else {
      TORCH_CHECK(block_bytes(type) && K % 32 == 0, "native: unsupported block type ", type);
      row_bytes = (int64_t)(K / 32) * block_bytes(type);
      TORCH_CHECK(t.scalar_type() == torch::kUInt8 && t.size(1) == row_bytes, "native: block weight must be (N, K/32*bytes) uint8");
    }
    data = (const uint8_t*)t.data_ptr();
  }
};

// y[m, n] = x[m] . W[n] for M activation rows (fp32 xf and, for block types, quantized xq), rows n in [n0, n1)
void matvec_rows(const Weight& w, int M, const float* xf, const std::vector<QRow>& xq, float* y, int64_t ldy,
                 int64_t n0, int64_t n1) {
  const Dots& D = dots();
  int nb = w.K / 32;
  bool multi = M > 1 && w.type != F32 && (w.type == Q8_0 ? D.q8m != nullptr : D.q4m != nullptr);
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* row = w.data + n * w.row_bytes;
    if (multi) {
      if (w.type == Q8_0) D.q8m(row, xq.data(), M, nb, y + n, ldy);  // in tiles of up to 4 rows
      else D.q4m(row, xq.data(), M, nb, w.type == Q4_0 ? 2 : 4, w.type == Q4_1, y + n, ldy);
      continue;
    }
    for (int m = 0; m < M; m++) {
      float v;
      switch (w.type) {
        case Q4_0: v = D.q4_0(row, xq[m], nb); break;
        case Q4_1: v = D.q4_1(row, xq[m], nb); break;
        case Q8_0: v = D.q8_0(row, xq[m], nb); break;
        default: v = D.f32((const float*)row, xf + (int64_t)m * w.K, w.K);
      }
      y[m * ldy + n] = v;
    }
  }
}

// the same over all rows, shared among the pool's threads (callers hold a PoolScope)
void matvec(const Weight& w, int M, const float* xf, const std::vector<QRow>& xq, float* y, int64_t ldy) {
  pool().run([&](int t, int nth) {
    int64_t n0, n1; share(w.N, t, nth, n0, n1);
    matvec_rows(w, M, xf, xq, y, ldy, n0, n1);
  });
}

void prepare(const Weight& w, int M, const float* x, std::vector<QRow>& xq) {
  if (w.type == F32) return;
  xq.resize(M);
  for (int m = 0; m < M; m++) quantize_row(x + (int64_t)m * w.K, w.K, xq[m]);
}

// one row of K weights (blocks of `type`, or F32) as fp32 or bf16
template <typename T>
void dequantize_row(int type, const uint8_t* p, int K, T* o) {
  if (type == F32) { for (int k = 0; k < K; k++) o[k] = (T)((const float*)p)[k]; return; }
  int bb = block_bytes(type);
  for (int b = 0; b < K / 32; b++, p += bb, o += 32) {
    float d = rd16(p);
    if (type == Q8_0) { for (int j = 0; j < 32; j++) o[j] = (T)(d * (int8_t)p[2 + j]); }
    else if (type == Q4_0) {
      for (int j = 0; j < 16; j++) { o[j] = (T)(d * ((p[2 + j] & 15) - 8)); o[j + 16] = (T)(d * ((p[2 + j] >> 4) - 8)); }
    } else {
      float m = rd16(p + 2);
      for (int j = 0; j < 16; j++) { o[j] = (T)(d * (p[4 + j] & 15) + m); o[j + 16] = (T)(d * (p[4 + j] >> 4) + m); }
    }
  }
}

// dequantize rows [0, N) of a weight into out (N, K) fp32 or bf16
template <typename T>
void dequantize_into(const Weight& w, T* out) {
  at::parallel_for(0, w.N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) dequantize_row(w.type, w.data + n * w.row_bytes, w.K, out + n * w.K);
  });
}

// ---- Python-facing single ops ----

torch::Tensor linear(torch::Tensor x, torch::Tensor blocks, int64_t type, int64_t K) {
  // x (M, K) float32 -> (M, N) float32
  Weight w(blocks, (int)type, (int)K);
  auto xc = x.contiguous().to(torch::kFloat32);
  TORCH_CHECK(xc.dim() == 2 && xc.size(1) == K, "native.linear: x must be (M, ", K, ")");
  int M = (int)xc.size(0);
  auto y = torch::empty({M, w.N}, torch::kFloat32);
  std::vector<QRow> xq;
  prepare(w, M, xc.data_ptr<float>(), xq);
  PoolScope scope(at::get_num_threads());
  matvec(w, M, xc.data_ptr<float>(), xq, y.data_ptr<float>(), w.N);
  return y;
}

torch::Tensor dequantize(torch::Tensor blocks, int64_t type, int64_t K, torch::ScalarType dtype) {
  Weight w(blocks, (int)type, (int)K);
  auto out = torch::empty({w.N, (int64_t)K}, dtype);
  if (dtype == torch::kFloat32) dequantize_into(w, out.data_ptr<float>());
  else if (dtype == torch::kBFloat16) dequantize_into(w, out.data_ptr<at::BFloat16>());
  else TORCH_CHECK(false, "native.dequantize: float32 or bfloat16 only");
  return out;
}

// ---- the fused one-token decode step ----

struct Layer { torch::Tensor attn_norm, ffn_norm; Weight wq, wk, wv, wo, w1, w2, w3; };

void rmsnorm(const float* x, const float* w, float* out, int D, float eps) {
  double ss = 0;
  for (int i = 0; i < D; i++) ss += (double)x[i] * x[i];
  float r = 1.f / std::sqrt((float)(ss / D) + eps);
  for (int i = 0; i < D; i++) out[i] = x[i] * r * w[i];
}

void rope(float* x, const float* cs, int n_heads, int hd) {
  // interleaved pairs; cs: (hd / 2, 2) cos, sin at this position
  for (int h = 0; h < n_heads; h++) {
    float* v = x + h * hd;
    for (int i = 0; i < hd / 2; i++) {
      float c = cs[2 * i], s = cs[2 * i + 1], a = v[2 * i], b = v[2 * i + 1];
      v[2 * i] = a * c - b * s; v[2 * i + 1] = a * s + b * c;
    }
  }
}

class Model {
 public:
  Model(std::vector<torch::Tensor> tensors, std::vector<int64_t> types, std::vector<int64_t> dims, double eps)
      : dim(dims[0]), n_layers(dims[1]), n_heads(dims[2]), n_kv(dims[3]), hd(dims[4]), hidden(dims[5]), vocab(dims[6]), eps((float)eps) {
    // tensors: emb, norm, output, then per layer attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3
    TORCH_CHECK((int64_t)tensors.size() == 3 + 9 * n_layers && tensors.size() == types.size(), "native.Model: wrong tensor list");
    emb = Weight(tensors[0], (int)types[0], dim);
    norm = tensors[1].contiguous();
    out = Weight(tensors[2], (int)types[2], dim);
    for (int l = 0; l < n_layers; l++) {
      auto T = [&](int i) { return tensors[3 + 9 * l + i]; };
      auto W = [&](int i, int K) { return Weight(T(i), (int)types[3 + 9 * l + i], K); };
      layers.push_back({T(0).contiguous(), T(5).contiguous(), W(1, dim), W(2, dim), W(3, dim), W(4, n_heads * hd),
                        W(6, dim), W(7, hidden), W(8, dim)});
    }
  }

  // tokens (B,), pos (B,) rotary positions, slots (B,) cache slots written, rows (B,) cache rows (empty: row b),
  // int64; mask: empty (attend slots 0..slot) or (B, Sm) bool (attend slot s < Sm where set); caches: k, v per
  // layer (Bc, n_kv, S, hd) fp32, contiguous; rope (> max pos, hd/2, 2) fp32. Several tokens of one sequence
  // (a speculative verify) share a cache row, each writing its slot and masking the later ones; every row's
  // arithmetic is the same as a one-token step's, so the logits are too. Returns logits (B, 1, vocab), or the
  // final-norm hidden states (B, 1, dim) with `want_hidden`.
  torch::Tensor step(torch::Tensor tokens, torch::Tensor pos, torch::Tensor slots, torch::Tensor rows, torch::Tensor mask,
                     std::vector<torch::Tensor> kc, std::vector<torch::Tensor> vc, torch::Tensor rope_table, bool want_hidden) {
    int B = (int)tokens.size(0);
    auto tok = tokens.contiguous(); auto ps = pos.contiguous(); auto sl = slots.contiguous(); auto rw = rows.contiguous();
    const int64_t* tk = tok.data_ptr<int64_t>(); const int64_t* pp = ps.data_ptr<int64_t>(); const int64_t* ss = sl.data_ptr<int64_t>();
    const int64_t* rr = rw.numel() ? rw.data_ptr<int64_t>() : nullptr;
    int64_t S = kc[0].size(2);
    TORCH_CHECK((int64_t)kc.size() == n_layers && kc[0].is_contiguous(), "native.step: caches do not match the model");
    TORCH_CHECK(!rr || rw.numel() == B, "native.step: one cache row per token");
    int64_t Sm = mask.numel() ? mask.size(1) : 0;
    TORCH_CHECK(!Sm || (mask.scalar_type() == torch::kBool && mask.size(0) == B && mask.is_contiguous() && Sm <= S), "native.step: bad mask");
    const bool* mk = Sm ? mask.data_ptr<bool>() : nullptr;
    std::vector<int64_t> row(B);
    for (int b = 0; b < B; b++) {
      row[b] = rr ? rr[b] : b;
      TORCH_CHECK(pp[b] >= 0 && pp[b] < rope_table.size(0) && ss[b] >= 0 && ss[b] < S && tk[b] >= 0 && tk[b] < vocab &&
                  row[b] >= 0 && row[b] < kc[0].size(0), "native.step: position, slot, row or token out of range");
    }
    const float* rt = rope_table.data_ptr<float>();
    int qd = n_heads * hd, kd = n_kv * hd;
    std::vector<float> x(B * dim), xn(B * dim), q(B * qd), k(B * kd), v(B * kd), att(B * qd), h1(B * hidden), h3(B * hidden), tmp(B * dim);
    std::vector<QRow> xq, xq2;
    PoolScope scope(at::get_num_threads());
    Pool& P = pool();
    for (int b = 0; b < B; b++) embed(tk[b], x.data() + b * dim);
    for (int l = 0; l < n_layers; l++) {
      const Layer& L = layers[l];
      for (int b = 0; b < B; b++) rmsnorm(x.data() + b * dim, L.attn_norm.data_ptr<float>(), xn.data() + b * dim, dim, eps);
      prepare(L.wq, B, xn.data(), xq);  // one activation quantization for q, k and v (unless their types differ)
      bool kq = L.wk.type != L.wq.type;
      if (kq) prepare(L.wk, B, xn.data(), xq2);
      P.run([&](int t, int nth) {  // q, k and v in one region: each thread its share of each
        int64_t n0, n1;
        share(L.wq.N, t, nth, n0, n1); matvec_rows(L.wq, B, xn.data(), xq, q.data(), qd, n0, n1);
        share(L.wk.N, t, nth, n0, n1); matvec_rows(L.wk, B, xn.data(), kq ? xq2 : xq, k.data(), kd, n0, n1);
        share(L.wv.N, t, nth, n0, n1);
        matvec_rows(L.wv, B, xn.data(), L.wv.type == L.wq.type ? xq : xq2, v.data(), kd, n0, n1);
      });
      if (L.wv.type != L.wq.type && L.wv.type != L.wk.type) {  // a third type: redo v with its own quantization
        prepare(L.wv, B, xn.data(), xq2);
        matvec(L.wv, B, xn.data(), xq2, v.data(), kd);
      }
      float* K0 = kc[l].data_ptr<float>(); float* V0 = vc[l].data_ptr<float>();
      for (int b = 0; b < B; b++) {
        const float* cs = rt + pp[b] * hd;  // (hd / 2, 2) at this position
        rope(q.data() + b * qd, cs, n_heads, hd);
        rope(k.data() + b * kd, cs, n_kv, hd);
        for (int g = 0; g < n_kv; g++) {
          int64_t off = ((row[b] * n_kv + g) * S + ss[b]) * hd;
          std::memcpy(K0 + off, k.data() + b * kd + g * hd, hd * 4);
          std::memcpy(V0 + off, v.data() + b * kd + g * hd, hd * 4);
        }
      }
      attention(B, row.data(), ss, mk, Sm, K0, V0, S, q.data(), att.data());
      prepare(L.wo, B, att.data(), xq);
      matvec(L.wo, B, att.data(), xq, tmp.data(), dim);
      for (int i = 0; i < B * dim; i++) x[i] += tmp[i];
      for (int b = 0; b < B; b++) rmsnorm(x.data() + b * dim, L.ffn_norm.data_ptr<float>(), xn.data() + b * dim, dim, eps);
      prepare(L.w1, B, xn.data(), xq);
      bool q3 = L.w3.type != L.w1.type;
      if (q3) prepare(L.w3, B, xn.data(), xq2);
      P.run([&](int t, int nth) {  // gate and up in one region, SwiGLU on the thread's own share
        int64_t n0, n1; share(hidden, t, nth, n0, n1);
        matvec_rows(L.w1, B, xn.data(), xq, h1.data(), hidden, n0, n1);
        matvec_rows(L.w3, B, xn.data(), q3 ? xq2 : xq, h3.data(), hidden, n0, n1);
        for (int b = 0; b < B; b++)
          for (int64_t i = b * (int64_t)hidden + n0; i < b * (int64_t)hidden + n1; i++) { float a = h1[i]; h1[i] = a / (1.f + std::exp(-a)) * h3[i]; }
      });
      prepare(L.w2, B, h1.data(), xq);
      matvec(L.w2, B, h1.data(), xq, tmp.data(), dim);
      for (int i = 0; i < B * dim; i++) x[i] += tmp[i];
    }
    for (int b = 0; b < B; b++) rmsnorm(x.data() + b * dim, norm.data_ptr<float>(), xn.data() + b * dim, dim, eps);
    if (want_hidden) {
      auto h = torch::empty({B, 1, (int64_t)dim}, torch::kFloat32);
      std::memcpy(h.data_ptr<float>(), xn.data(), (size_t)B * dim * 4);
      return h;
    }
    auto logits = torch::empty({B, 1, (int64_t)vocab}, torch::kFloat32);
    prepare(out, B, xn.data(), xq);
    matvec(out, B, xn.data(), xq, logits.data_ptr<float>(), vocab);
    return logits;
  }

  std::string isa() const { return dots().name; }

 private:
  int dim, n_layers, n_heads, n_kv, hd, hidden, vocab;
  float eps;
  Weight emb, out;
  torch::Tensor norm;
  std::vector<Layer> layers;

  void embed(int64_t t, float* o) { dequantize_row(emb.type, emb.data + t * emb.row_bytes, dim, o); }

  // softmax(q k^T / sqrt(hd)) v over cache slots 0..slot of each token's cache row (or the slots its mask row
  // sets); query head h reads kv head h / rep. Keys go in chunks of ATTN_CHUNK (flash-decoding): the (token,
  // kv head, chunk) items are shared among the threads, then each head's chunks are merged. Chunks depend only
  // on a token's own span (never on the thread count or the batch), so a row's result does not either.
  static constexpr int64_t ATTN_CHUNK = 256;
  void attention(int B, const int64_t* row, const int64_t* ss, const bool* mk, int64_t Sm, const float* K0, const float* V0,
                 int64_t S, const float* q, float* out) {
    int rep = n_heads / n_kv, qd = n_heads * hd;
    float scale = 1.f / std::sqrt((float)hd);
    auto attn = (hd % 8 == 0) ? dots().attn : attn_chunk_ref;
    struct Item { int b, g; int64_t s0, s1; };
    std::vector<Item> items;
    std::vector<int64_t> first(B + 1);  // items of token b: [first[b], first[b + 1]), g-major
    for (int b = 0; b < B; b++) {
      first[b] = (int64_t)items.size();
      int64_t n = ss[b] + 1;
      if (mk) { n = Sm; while (n > 0 && !mk[b * Sm + n - 1]) n--; }
      for (int g = 0; g < n_kv; g++)
        for (int64_t s0 = 0; s0 < std::max<int64_t>(n, 1); s0 += ATTN_CHUNK) items.push_back({b, g, s0, std::min(n, s0 + ATTN_CHUNK)});
    }
    first[B] = (int64_t)items.size();
    int64_t per = (int64_t)rep * (hd + 2);  // mx, l, o for the rep heads
    std::vector<float> part(items.size() * per);
    pool().run([&](int t, int nth) {
      int64_t i0, i1; share((int64_t)items.size(), t, nth, i0, i1);
      std::vector<float> sc;
      for (int64_t i = i0; i < i1; i++) {
        const Item& it = items[i];
        sc.resize((size_t)rep * std::max<int64_t>(it.s1 - it.s0, 1));
        const float* Kb = K0 + (row[it.b] * n_kv + it.g) * S * hd;
        const float* Vb = V0 + (row[it.b] * n_kv + it.g) * S * hd;
        float* pr = part.data() + i * per;
        attn(Kb, Vb, hd, q + it.b * qd + it.g * rep * hd, rep, scale, mk ? mk + it.b * Sm : nullptr, it.s0, it.s1,
             pr, pr + rep, pr + 2 * rep, sc.data());
      }
    });
    for (int b = 0; b < B; b++) {
      int64_t nc = (first[b + 1] - first[b]) / n_kv;  // chunks per kv head
      for (int g = 0; g < n_kv; g++)
        for (int r = 0; r < rep; r++) {
          float* o = out + b * qd + (g * rep + r) * hd;
          float m = -INFINITY, l = 0;
          for (int64_t c = 0; c < nc; c++) m = std::max(m, part[(first[b] + g * nc + c) * per + r]);
          for (int j = 0; j < hd; j++) o[j] = 0;
          if (m == -INFINITY) continue;  // nothing to attend: zeros
          for (int64_t c = 0; c < nc; c++) {
            const float* pr = part.data() + (first[b] + g * nc + c) * per;
            if (pr[r] == -INFINITY) continue;
            float w = std::exp(pr[r] - m);
            l += w * pr[rep + r];
            const float* oc = pr + 2 * rep + r * hd;
            for (int j = 0; j < hd; j++) o[j] += w * oc[j];
          }
          float il = 1.f / l;
          for (int j = 0; j < hd; j++) o[j] *= il;
        }
    }
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llamaforge native CPU kernels: GGUF block dot products and a fused decode step";
  m.def("linear", &linear, "y = x W^T for x (M, K) fp32 and W as GGUF blocks (type id) or F32");
  m.def("dequantize", &dequantize, "W (N, K) as float32 / bfloat16 from GGUF blocks");
  m.def("isa", []() { return std::string(dots().name); }, "the dot-product path this CPU runs");
  py::class_<Model>(m, "Model")
      .def(py::init<std::vector<torch::Tensor>, std::vector<int64_t>, std::vector<int64_t>, double>())
      .def("step", &Model::step, py::call_guard<py::gil_scoped_release>())
      .def("isa", &Model::isa);
}
