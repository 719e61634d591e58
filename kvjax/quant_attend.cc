// Decode attention over a quantized K/V store on CPU: unpack + dequantize + q.k^T + online softmax + p.v
// fused in one pass, called from JAX through XLA's FFI (kvjax/native.py builds and registers it).
//
// Why: XLA:CPU does not fuse the code -> float32 conversion into a dot, so on the jnp path every block's
// codes are written out as float32 (the dense cache's bytes) and read back by the dot, and its unpack
// loop runs at ~0.5 ns per element (experiments/results/quant_decode_speed.md). Here each token's key
// and value rows are unpacked and dequantized into a 1-row buffer that stays in L1, and consumed at once
// by the few queries of a decode step: the codes are read once, nothing of the size of the store is written.
//
// Legend: B batch, K KV heads, Hs store rows (K: one per head; 1: a pool shared by the heads of a row),
// S store slots, M folded query rows (G query heads x T queries), D key dim, Dv value dim,
// P packed bytes per row (D * bits / 8). Per head (b, k) the store holds the slots
// [start[b, k], start[b, k] + n[b, k]) of row (Hs == K ? k : 0); slot s is visible to query row m iff
// pos[b, r, s] <= qpos[b, m] (the jnp reference: kvjax.attention.online_attention with QuantStore parts).
//
// Codes (kvjax/quant.py's formats): kind 0 "uniform" unsigned b-bit codes (b = 2, 4, 8), code i of a
//   byte in bits [b*i, b*(i+1)); x = code * scale + zero. kind 1 "int8": signed bytes, x = code * scale.
//   kind 2 "fp8": float8 e4m3fn bytes, x = fp8 * scale.
// Scale layouts: axis 1 "per token" (groups of `group` channels): scale [.., S, D/group];
//   axis 2 "per channel" (groups of `group` tokens): scale [.., S/group, D]. zero as scale (kind 0 only).
//
// The online softmax continues from the carry (m, l, acc) it is given (the sink's part before it), so
// the result is that of the reference's block loop up to float32 rounding (exp here is a Cephes-style
// polynomial, ~1 ulp).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 64;  // tokens whose scores are taken before their softmax and values

// 16 floats: one AVX-512 register (two AVX2 ones); rows are NV of them (D = 16 NV channels).
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint8_t v16b __attribute__((vector_size(16)));

template <typename V>
inline V load(const void* p) {
  V x;
  std::memcpy(&x, p, sizeof(V));
  return x;
}

// Widening 16 bytes to 16 int32 / 16 uint16 lanes: gcc 12 lowers __builtin_convertvector between vectors of
// different sizes one lane at a time, so the AVX-512 / AVX2 instructions are spelled out (scalar otherwise).
inline v16i widen32(v16b x, bool is_signed) {
#if defined(__AVX512F__)
  const __m128i b = reinterpret_cast<__m128i&>(x);
  const __m512i w = is_signed ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
  return reinterpret_cast<const v16i&>(w);
#elif defined(__AVX2__)
  const __m128i b = reinterpret_cast<__m128i&>(x);
  __m256i w[2];
  w[0] = is_signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
  w[1] = is_signed ? _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)) : _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
  return load<v16i>(w);
#else
  v16i w;
  for (int i = 0; i < 16; ++i) w[i] = is_signed ? static_cast<int8_t>(x[i]) : x[i];
  return w;
#endif
}

inline v16h widen16(v16b x) {
#if defined(__AVX2__)
  const __m256i w = _mm256_cvtepu8_epi16(reinterpret_cast<__m128i&>(x));
  return reinterpret_cast<const v16h&>(w);
#else
  v16h w;
  for (int i = 0; i < 16; ++i) w[i] = x[i];
  return w;
#endif
}

inline v16f to_float(v16b x, bool is_signed = false) { return __builtin_convertvector(widen32(x, is_signed), v16f); }

// ------------------------------------------------------------------------------ code -> float32
// Each decoder turns one row of codes into NV vectors of 16 floats in channel order, in registers:
// sub-byte codes are spread to one byte each by shifts and masks on wider integer lanes (a 4-bit byte
// b -> the 16-bit lane (b & 15) | (b >> 4) << 8, a 2-bit byte -> a 32-bit lane of 4 bytes), whose
// bytes in memory order are then the codes in channel order.
template <int NV>
void decode(int kind, int bits, const uint8_t* in, v16f* out) {
  if (kind == 1) {  // int8
    for (int j = 0; j < NV; ++j) out[j] = to_float(load<v16b>(in + 16 * j), true);
  } else if (kind == 2) {  // fp8 e4m3fn: s eeee mmm; (8 + m) 2^(e - 10), subnormal m 2^-9, NaN at 1111 111
    for (int j = 0; j < NV; ++j) {
      const v16i u = widen32(load<v16b>(in + 16 * j), false);
      const v16i e = (u >> 3) & 15, m = u & 7;
      const v16i normal = ((e + 120) << 23) | (m << 20);
      const v16f sub = __builtin_convertvector(m, v16f) * (1.f / 512.f);
      v16f mag = e == 0 ? sub : reinterpret_cast<const v16f&>(normal);
      mag = (u & 127) == 127 ? v16f{} + NAN : mag;
      out[j] = u >= 128 ? -mag : mag;
    }
  } else if (bits == 8) {
    for (int j = 0; j < NV; ++j) out[j] = to_float(load<v16b>(in + 16 * j));
  } else if (bits == 4) {  // 16 bytes -> 32 codes
    for (int j = 0; j < NV; j += 2) {
      const v16h x = widen16(load<v16b>(in + 8 * j));
      const v16h w = (x & 15) | ((x << 4) & 0xF00);
      out[j] = to_float(load<v16b>(&w));
      out[j + 1] = to_float(load<v16b>(reinterpret_cast<const uint8_t*>(&w) + 16));
    }
  } else {  // 2 bits: 16 bytes -> 64 codes
    for (int j = 0; j < NV; j += 4) {
      const v16u x = reinterpret_cast<const v16u&>(static_cast<const v16i&>(widen32(load<v16b>(in + 4 * j), false)));
      const v16u w = (x & 3) | ((x << 6) & 0x300) | ((x << 12) & 0x30000) | ((x << 18) & 0x3000000);
      for (int i = 0; i < 4; ++i)
        out[j + i] = to_float(load<v16b>(reinterpret_cast<const uint8_t*>(&w) + 16 * i));
    }
  }
}

// One quantized operand (keys or values) of one head: slot s as a dequantized row of NV vectors.
template <int NV>
struct Rows {
  const uint8_t* codes;  // [S, P] of the head's store row
  const float* scale;    // per token [S, D/group] or per channel [S/group, D]
  const float* zero;     // like scale, or nullptr
  int kind, bits, bytes, group;
  bool per_channel;

  void row(int64_t s, v16f* out) const {
    decode<NV>(kind, bits, codes + s * bytes, out);
    if (per_channel) {
      const float* sc = scale + (s / group) * 16 * NV;
      const float* z = zero ? zero + (s / group) * 16 * NV : nullptr;
      if (z) {
        for (int j = 0; j < NV; ++j) out[j] = out[j] * load<v16f>(sc + 16 * j) + load<v16f>(z + 16 * j);
      } else {
        for (int j = 0; j < NV; ++j) out[j] *= load<v16f>(sc + 16 * j);
      }
      return;
    }
    const int ng = 16 * NV / group;  // groups of the row
    float* o = reinterpret_cast<float*>(out);
    for (int gi = 0; gi < ng; ++gi) {
      const float sc = scale[s * ng + gi], z = zero ? zero[s * ng + gi] : 0.f;
      for (int c = gi * group; c < (gi + 1) * group; ++c) o[c] = o[c] * sc + z;
    }
  }
};

// r[i] = sum of the 16 lanes of x[i], i < 16: a tree of shuffles and adds (4 levels, halving the lanes
// per vector and pairing vectors), ~3 instructions per vector instead of a horizontal sum each.
inline v16f hsum16(const v16f* x) {
#if !defined(__AVX512F__)  // 8-float registers: halves added, then the tree on 8-lane vectors (two-register
  // shuffles of 16 lanes are not single instructions there)
  typedef float v8f __attribute__((vector_size(32)));
  typedef int32_t v8i __attribute__((vector_size(32)));
  const v8i l1 = {0, 1, 2, 3, 8, 9, 10, 11}, h1 = l1 + 4, l2 = {0, 1, 8, 9, 4, 5, 12, 13}, h2 = l2 + 2;
  const v8i l3 = {0, 8, 2, 10, 4, 12, 6, 14}, h3 = l3 + 1, rev = {0, 4, 2, 6, 1, 5, 3, 7};
  float out[16];
  for (int half = 0; half < 2; ++half) {
    v8f h[8], y[4], z[2];
    for (int i = 0; i < 8; ++i) {
      v8f a[2];
      std::memcpy(a, &x[8 * half + i], 64);
      h[i] = a[0] + a[1];
    }
    for (int i = 0; i < 4; ++i) y[i] = __builtin_shuffle(h[2 * i], h[2 * i + 1], l1) + __builtin_shuffle(h[2 * i], h[2 * i + 1], h1);
    for (int i = 0; i < 2; ++i) z[i] = __builtin_shuffle(y[2 * i], y[2 * i + 1], l2) + __builtin_shuffle(y[2 * i], y[2 * i + 1], h2);
    const v8f r = __builtin_shuffle(__builtin_shuffle(z[0], z[1], l3) + __builtin_shuffle(z[0], z[1], h3), rev);
    std::memcpy(out + 8 * half, &r, 32);
  }
  return load<v16f>(out);
#else
  const v16i lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const v16i hi1 = lo1 + 8;
  const v16i lo2 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
  const v16i hi2 = lo2 + 4;
  const v16i lo3 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const v16i hi3 = lo3 + 2;
  const v16i lo4 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
  const v16i hi4 = lo4 + 1;
  const v16i bitrev = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  v16f y[8], z[4], w[2];
  for (int i = 0; i < 8; ++i) y[i] = __builtin_shuffle(x[2 * i], x[2 * i + 1], lo1) + __builtin_shuffle(x[2 * i], x[2 * i + 1], hi1);
  for (int i = 0; i < 4; ++i) z[i] = __builtin_shuffle(y[2 * i], y[2 * i + 1], lo2) + __builtin_shuffle(y[2 * i], y[2 * i + 1], hi2);
  for (int i = 0; i < 2; ++i) w[i] = __builtin_shuffle(z[2 * i], z[2 * i + 1], lo3) + __builtin_shuffle(z[2 * i], z[2 * i + 1], hi3);
  const v16f r = __builtin_shuffle(w[0], w[1], lo4) + __builtin_shuffle(w[0], w[1], hi4);
  return __builtin_shuffle(r, bitrev);  // r holds the sum of x[i] in lane bitrev(i)
#endif
}

// exp(x) for x <= 0 and -inf (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial); 0 below -87.
inline float exp_neg(float x) {
  const bool tiny = !(x >= -87.f);
  x = tiny ? -87.f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two;
  std::memcpy(&two, &bits, 4);
  return tiny ? 0.f : p * two;
}

// One head: continues the online softmax (m [M], l [M], acc [M, D]) over slots [first, first + n).
template <int NV>
void head(const float* q, const int32_t* qpos, const int32_t* pos, const Rows<NV>& k, const Rows<NV>& v,
          int64_t first, int64_t n, int mrows, float* m, float* l, float* acc) {
  std::vector<v16f> qv(static_cast<size_t>(mrows) * NV), av(static_cast<size_t>(mrows) * NV);
  std::vector<v16f> vt(static_cast<size_t>(kTile) * NV);  // the tile's dequantized values (16 KiB at D = 64)
  std::vector<float> sc(static_cast<size_t>(mrows) * kTile);
  std::vector<v16f> part(static_cast<size_t>(mrows) * kTile);  // q . k before the sum over its 16 lanes
  for (int i = 0; i < mrows * NV; ++i) {
    qv[i] = load<v16f>(q + 16 * i);
    av[i] = load<v16f>(acc + 16 * i);
  }
  v16f kr[NV];
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int nt = static_cast<int>(n - t0 < kTile ? n - t0 : kTile);
    for (int t = 0; t < nt; ++t) {  // scores of the tile (per lane), and its values dequantized
      const int64_t s = first + t0 + t;
      k.row(s, kr);
      for (int i = 0; i < mrows; ++i) {
        const v16f* qi = qv.data() + i * NV;
        v16f a = qi[0] * kr[0];
        for (int j = 1; j < NV; ++j) a += qi[j] * kr[j];
        part[i * kTile + t] = a;
      }
      v.row(s, vt.data() + t * NV);
    }
    for (int i = 0; i < mrows; ++i) {  // the scores, masked; online softmax update, then p . v
      float* si = sc.data() + i * kTile;
      for (int t = 0; t < nt; t += 16) {
        const v16f r = hsum16(part.data() + i * kTile + t);  // lanes past nt are unused
        std::memcpy(si + t, &r, 64);
      }
      const int32_t* ps = pos + first + t0;
      for (int t = 0; t < nt; ++t) si[t] = ps[t] <= qpos[i] ? si[t] : -INFINITY;
      float mx = m[i];
      for (int t = 0; t < nt; ++t) mx = si[t] > mx ? si[t] : mx;
      if (mx == -INFINITY) continue;  // nothing visible yet
      const float corr = exp_neg(m[i] - mx);
      float sum = 0.f;
      for (int t = 0; t < nt; ++t) {
        si[t] = exp_neg(si[t] - mx);
        sum += si[t];
      }
      l[i] = l[i] * corr + sum;
      m[i] = mx;
      // float loops over a row (16 NV, a constant): vectorized at the machine's width (as 64-byte
      // vectors, AVX2 code would go through the stack)
      float* a = reinterpret_cast<float*>(av.data() + i * NV);
      const float* vf = reinterpret_cast<const float*>(vt.data());
      for (int c = 0; c < 16 * NV; ++c) a[c] *= corr;
      for (int t = 0; t < nt; ++t)
        for (int c = 0; c < 16 * NV; ++c) a[c] += si[t] * vf[t * 16 * NV + c];
    }
  }
  for (int i = 0; i < mrows * NV; ++i) std::memcpy(acc + 16 * i, &av[i], 64);
}

template <int NV>
void heads(const float* q, const int32_t* qpos, const int32_t* pos, const int32_t* start, const int32_t* count,
           const uint8_t* kc, const float* ks, const float* kz, const uint8_t* vc, const float* vs,
           const float* vz, const int64_t* attr, int64_t b, int64_t nk, int64_t hs, int64_t slots, int64_t mrows,
           int64_t kp, int64_t vp, int64_t k_row, int64_t v_row, float* m, float* l, float* acc) {
  constexpr int d = 16 * NV;
  for (int64_t bi = 0; bi < b; ++bi) {
    for (int64_t ki = 0; ki < nk; ++ki) {
      const int64_t row = bi * hs + (hs == nk ? ki : 0), hd = bi * nk + ki;
      const Rows<NV> keys{kc + row * slots * kp, ks + row * k_row, attr[0] == 0 ? kz + row * k_row : nullptr,
                          static_cast<int>(attr[0]), static_cast<int>(attr[1]), static_cast<int>(kp),
                          static_cast<int>(attr[3]), attr[2] == 2};
      const Rows<NV> vals{vc + row * slots * vp, vs + row * v_row, attr[4] == 0 ? vz + row * v_row : nullptr,
                          static_cast<int>(attr[4]), static_cast<int>(attr[5]), static_cast<int>(vp),
                          static_cast<int>(attr[7]), attr[6] == 2};
      head<NV>(q + hd * mrows * d, qpos + bi * mrows, pos + row * slots, keys, vals, start[hd], count[hd],
               static_cast<int>(mrows), m + hd * mrows, l + hd * mrows, acc + hd * mrows * d);
    }
  }
}

ffi::Error QuantAttendImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> qpos, ffi::Buffer<ffi::F32> m_in,
                           ffi::Buffer<ffi::F32> l_in, ffi::Buffer<ffi::F32> acc_in, ffi::AnyBuffer kc,
                           ffi::Buffer<ffi::F32> ks, ffi::Buffer<ffi::F32> kz, ffi::AnyBuffer vc,
                           ffi::Buffer<ffi::F32> vs, ffi::Buffer<ffi::F32> vz, ffi::Buffer<ffi::S32> pos,
                           ffi::Buffer<ffi::S32> start, ffi::Buffer<ffi::S32> count, int64_t k_kind, int64_t k_bits,
                           int64_t k_axis, int64_t k_group, int64_t v_kind, int64_t v_bits, int64_t v_axis,
                           int64_t v_group, ffi::ResultBuffer<ffi::F32> m_out, ffi::ResultBuffer<ffi::F32> l_out,
                           ffi::ResultBuffer<ffi::F32> acc_out) {
  const auto qd = q.dimensions();  // [B, K, M, D]
  const auto cd = kc.dimensions(), vd = vc.dimensions();  // [B, Hs, S, P]
  const int64_t b = qd[0], nk = qd[1], mrows = qd[2], d = qd[3];
  const int64_t hs = cd[1], slots = cd[2];
  const int64_t k_row = ks.element_count() / (b * hs), v_row = vs.element_count() / (b * hs);
  const int64_t attr[8] = {k_kind, k_bits, k_axis, k_group, v_kind, v_bits, v_axis, v_group};
  if (acc_in.dimensions()[3] != d) return ffi::Error::InvalidArgument("quant_attend: keys and values differ in width");
  std::memcpy(m_out->typed_data(), m_in.typed_data(), m_in.size_bytes());
  std::memcpy(l_out->typed_data(), l_in.typed_data(), l_in.size_bytes());
  std::memcpy(acc_out->typed_data(), acc_in.typed_data(), acc_in.size_bytes());
  const auto* kbytes = static_cast<const uint8_t*>(kc.untyped_data());
  const auto* vbytes = static_cast<const uint8_t*>(vc.untyped_data());
  auto run = [&](auto fn) {
    fn(q.typed_data(), qpos.typed_data(), pos.typed_data(), start.typed_data(), count.typed_data(), kbytes,
       ks.typed_data(), kz.typed_data(), vbytes, vs.typed_data(), vz.typed_data(), attr, b, nk, hs, slots, mrows,
       cd[3], vd[3], k_row, v_row, m_out->typed_data(), l_out->typed_data(), acc_out->typed_data());
  };
  if (d == 64) run(heads<4>);
  else if (d == 128) run(heads<8>);
  else if (d == 256) run(heads<16>);
  else return ffi::Error::InvalidArgument("quant_attend: head dim must be 64, 128 or 256");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvjaxQuantAttend, QuantAttendImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [B, K, M, D], scaled
                                  .Arg<ffi::Buffer<ffi::S32>>()   // qpos [B, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // m [B, K, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // l [B, K, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // acc [B, K, M, Dv]
                                  .Arg<ffi::AnyBuffer>()          // key codes [B, Hs, S, Pk], bytes of any type
                                  .Arg<ffi::Buffer<ffi::F32>>()   // key scales
                                  .Arg<ffi::Buffer<ffi::F32>>()   // key zeros (unread unless kind 0)
                                  .Arg<ffi::AnyBuffer>()          // value codes [B, Hs, S, Pv]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // value scales
                                  .Arg<ffi::Buffer<ffi::F32>>()   // value zeros
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pos [B, Hs, S]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // start [B, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // count [B, K]
                                  .Attr<int64_t>("k_kind")
                                  .Attr<int64_t>("k_bits")
                                  .Attr<int64_t>("k_axis")
                                  .Attr<int64_t>("k_group")
                                  .Attr<int64_t>("v_kind")
                                  .Attr<int64_t>("v_bits")
                                  .Attr<int64_t>("v_axis")
                                  .Attr<int64_t>("v_group")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // m
                                  .Ret<ffi::Buffer<ffi::F32>>()   // l
                                  .Ret<ffi::Buffer<ffi::F32>>());  // acc
