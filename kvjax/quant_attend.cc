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

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 64;  // tokens whose scores are taken before their softmax and values

// ------------------------------------------------------------------------------ code -> float32
using Decode = void (*)(const uint8_t*, float*, int);

template <int BITS>
void decode_uniform(const uint8_t* in, float* out, int d) {
  constexpr int per = 8 / BITS;
  constexpr unsigned mask = (1u << BITS) - 1;
  for (int j = 0; j < d / per; ++j)
    for (int i = 0; i < per; ++i) out[j * per + i] = static_cast<float>((in[j] >> (BITS * i)) & mask);
}

void decode_int8(const uint8_t* in, float* out, int d) {
  const int8_t* s = reinterpret_cast<const int8_t*>(in);
  for (int c = 0; c < d; ++c) out[c] = static_cast<float>(s[c]);
}

struct Fp8Table {  // e4m3fn: s eeee mmm; (8 + m) 2^(e - 10), subnormal m 2^-9, NaN at eeee mmm = 1111 111
  float v[256];
  Fp8Table() {
    for (int u = 0; u < 256; ++u) {
      int e = (u >> 3) & 15, m = u & 7;
      float mag = e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(static_cast<float>(8 + m), e - 10);
      if ((u & 127) == 127) mag = NAN;
      v[u] = u >= 128 ? -mag : mag;
    }
  }
};
const Fp8Table kFp8;

void decode_fp8(const uint8_t* in, float* out, int d) {
  for (int c = 0; c < d; ++c) out[c] = kFp8.v[in[c]];
}

Decode decoder(int64_t kind, int64_t bits) {
  if (kind == 1) return decode_int8;
  if (kind == 2) return decode_fp8;
  return bits == 2 ? decode_uniform<2> : bits == 4 ? decode_uniform<4> : decode_uniform<8>;
}

// One quantized operand (keys or values) of one head: decodes slot s into a dequantized float row.
struct Rows {
  const uint8_t* codes;  // [S, P] of the head's store row
  const float* scale;    // per token [S, D/group] or per channel [S/group, D]
  const float* zero;     // like scale, or nullptr
  int d, bytes, group;
  bool per_channel;
  Decode decode;

  void row(int64_t s, float* out) const {
    decode(codes + s * bytes, out, d);
    if (per_channel) {
      const float* sc = scale + (s / group) * d;
      if (zero) {
        const float* z = zero + (s / group) * d;
        for (int c = 0; c < d; ++c) out[c] = out[c] * sc[c] + z[c];
      } else {
        for (int c = 0; c < d; ++c) out[c] *= sc[c];
      }
      return;
    }
    const int ng = d / group;
    for (int j = 0; j < ng; ++j) {
      const float sc = scale[s * ng + j], z = zero ? zero[s * ng + j] : 0.f;
      float* o = out + j * group;
      for (int c = 0; c < group; ++c) o[c] = o[c] * sc + z;
    }
  }
};

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

// One head: continues the online softmax (m [M], l [M], acc [M, Dv]) over slots [first, first + n).
void head(const float* q, const int32_t* qpos, const int32_t* pos, const Rows& k, const Rows& v, int64_t first,
          int64_t n, int mrows, float* m, float* l, float* acc) {
  const int d = k.d, dv = v.d;
  std::vector<float> krow(d), vrow(dv), sc(static_cast<size_t>(mrows) * kTile);
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int nt = static_cast<int>(n - t0 < kTile ? n - t0 : kTile);
    for (int t = 0; t < nt; ++t) {  // scores of the tile
      const int64_t s = first + t0 + t;
      k.row(s, krow.data());
      for (int i = 0; i < mrows; ++i) {
        const float* qi = q + static_cast<int64_t>(i) * d;
        float dot = 0.f;
        for (int c = 0; c < d; ++c) dot += qi[c] * krow[c];
        sc[i * kTile + t] = pos[s] <= qpos[i] ? dot : -INFINITY;
      }
    }
    for (int i = 0; i < mrows; ++i) {  // online softmax update, probabilities in place of the scores
      float* si = sc.data() + i * kTile;
      float mx = m[i];
      for (int t = 0; t < nt; ++t) mx = si[t] > mx ? si[t] : mx;
      if (mx == -INFINITY) {  // nothing visible yet: p = 0
        for (int t = 0; t < nt; ++t) si[t] = 0.f;
        continue;
      }
      const float corr = exp_neg(m[i] - mx);
      float sum = 0.f;
      for (int t = 0; t < nt; ++t) {
        si[t] = exp_neg(si[t] - mx);
        sum += si[t];
      }
      l[i] = l[i] * corr + sum;
      m[i] = mx;
      float* ai = acc + static_cast<int64_t>(i) * dv;
      for (int c = 0; c < dv; ++c) ai[c] *= corr;
    }
    for (int t = 0; t < nt; ++t) {  // p . v of the tile
      v.row(first + t0 + t, vrow.data());
      for (int i = 0; i < mrows; ++i) {
        const float p = sc[i * kTile + t];
        float* ai = acc + static_cast<int64_t>(i) * dv;
        for (int c = 0; c < dv; ++c) ai[c] += p * vrow[c];
      }
    }
  }
}

ffi::Error QuantAttendImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> qpos, ffi::Buffer<ffi::F32> m_in,
                           ffi::Buffer<ffi::F32> l_in, ffi::Buffer<ffi::F32> acc_in, ffi::Buffer<ffi::U8> kc,
                           ffi::Buffer<ffi::F32> ks, ffi::Buffer<ffi::F32> kz, ffi::Buffer<ffi::U8> vc,
                           ffi::Buffer<ffi::F32> vs, ffi::Buffer<ffi::F32> vz, ffi::Buffer<ffi::S32> pos,
                           ffi::Buffer<ffi::S32> start, ffi::Buffer<ffi::S32> count, int64_t k_kind, int64_t k_bits,
                           int64_t k_axis, int64_t k_group, int64_t v_kind, int64_t v_bits, int64_t v_axis,
                           int64_t v_group, ffi::ResultBuffer<ffi::F32> m_out, ffi::ResultBuffer<ffi::F32> l_out,
                           ffi::ResultBuffer<ffi::F32> acc_out) {
  const auto qd = q.dimensions();  // [B, K, M, D]
  const auto cd = kc.dimensions(), vd = vc.dimensions();  // [B, Hs, S, P]
  const int64_t b = qd[0], nk = qd[1], mrows = qd[2], d = qd[3];
  const int64_t hs = cd[1], slots = cd[2], kp = cd[3], vp = vd[3];
  const int64_t dv = acc_in.dimensions()[3];
  const int64_t k_scale_row = ks.element_count() / (b * hs), v_scale_row = vs.element_count() / (b * hs);
  std::memcpy(m_out->typed_data(), m_in.typed_data(), m_in.size_bytes());
  std::memcpy(l_out->typed_data(), l_in.typed_data(), l_in.size_bytes());
  std::memcpy(acc_out->typed_data(), acc_in.typed_data(), acc_in.size_bytes());
  for (int64_t bi = 0; bi < b; ++bi) {
    for (int64_t ki = 0; ki < nk; ++ki) {
      const int64_t row = bi * hs + (hs == nk ? ki : 0), hd = bi * nk + ki;
      const Rows keys{kc.typed_data() + row * slots * kp, ks.typed_data() + row * k_scale_row,
                      k_kind == 0 ? kz.typed_data() + row * k_scale_row : nullptr, static_cast<int>(d),
                      static_cast<int>(kp), static_cast<int>(k_group), k_axis == 2, decoder(k_kind, k_bits)};
      const Rows vals{vc.typed_data() + row * slots * vp, vs.typed_data() + row * v_scale_row,
                      v_kind == 0 ? vz.typed_data() + row * v_scale_row : nullptr, static_cast<int>(dv),
                      static_cast<int>(vp), static_cast<int>(v_group), v_axis == 2, decoder(v_kind, v_bits)};
      head(q.typed_data() + hd * mrows * d, qpos.typed_data() + bi * mrows, pos.typed_data() + row * slots, keys,
           vals, start.typed_data()[hd], count.typed_data()[hd], static_cast<int>(mrows),
           m_out->typed_data() + hd * mrows, l_out->typed_data() + hd * mrows,
           acc_out->typed_data() + hd * mrows * dv);
    }
  }
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
                                  .Arg<ffi::Buffer<ffi::U8>>()    // key codes [B, Hs, S, Pk]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // key scales
                                  .Arg<ffi::Buffer<ffi::F32>>()   // key zeros (unread unless kind 0)
                                  .Arg<ffi::Buffer<ffi::U8>>()    // value codes [B, Hs, S, Pv]
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
