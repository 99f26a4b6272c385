// The pointwise math of one multiplicative-LSTM step, forward and backward, one (b, n) element per
// call. The CUDA kernels (mlstm_kernels.cu) are grid-stride loops over these functions; the tests
// run the same functions in host loops (tests/csrc_host/) to check the driver without a GPU.
//
// Legend: B batch rows, H hidden units, G = 4 gates (i, f, o, u); idx = b * H + n runs over one
// step's [B, H] elements, b the batch row, n the hidden unit. Row strides: proj and dproj 5H, act 6H,
// z 4H, everything else H (layouts in mlstm.h).
//
// Numerics (the contract of fastmlstm/ops/interface.py): loads widen to float32, all arithmetic is
// float32, stores round to the activation dtype (round to nearest even); c, dh and dc stay float32.
// The formulas and their evaluation order follow fastmlstm/ops/reference/recurrence.py. A null pointer means
// "absent" (no saving, no lengths, no incoming gradient).
#pragma once

#include <cmath>
#include <cstdint>

#include <c10/macros/Macros.h>

namespace fastmlstm {
namespace pointwise {

// exp(-x) overflows to inf for very negative x, giving 1 / inf = 0: no NaN either way. The same
// expression as torch.sigmoid's CUDA kernel; tanhf saturates cleanly to +-1.
C10_HOST_DEVICE inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename scalar_t>
C10_HOST_DEVICE inline float widen(scalar_t x) {
  return static_cast<float>(x);
}

template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t narrow(float x) {
  return static_cast<scalar_t>(x);
}

// m = xm * hm; with act, saves xm and hm.
template <typename scalar_t>
C10_HOST_DEVICE inline void forward_m(int64_t idx, int64_t H, const float* hm, const scalar_t* proj, scalar_t* m,
                                      scalar_t* act) {
  const int64_t b = idx / H;
  const int64_t n = idx - b * H;
  const scalar_t xm = proj[b * 5 * H + 4 * H + n];
  const float hm_v = hm[idx];
  m[idx] = narrow<scalar_t>(widen(xm) * hm_v);
  if (act != nullptr) {
    scalar_t* a = act + b * 6 * H + n;
    a[4 * H] = xm;
    a[5 * H] = narrow<scalar_t>(hm_v);
  }
}

// Gates from z = m Wh^T plus the gate columns of proj, then c_t and h_t; h and c hold step t-1's
// state on entry and step t's on exit.
template <typename scalar_t>
C10_HOST_DEVICE inline void forward_cell(int64_t idx, int64_t H, const float* z, const scalar_t* proj, scalar_t* h,
                                         float* c, scalar_t* out, float* cell, scalar_t* act, const int64_t* lengths,
                                         int64_t t) {
  const int64_t b = idx / H;
  const int64_t n = idx - b * H;
  const float* zb = z + b * 4 * H + n;
  const scalar_t* x = proj + b * 5 * H + n;
  const float i = sigmoid(zb[0] + widen(x[0]));
  const float f = sigmoid(zb[H] + widen(x[H]));
  const float o = sigmoid(zb[2 * H] + widen(x[2 * H]));
  const float u = tanhf(zb[3 * H] + widen(x[3 * H]));
  const float c_prev = c[idx];
  float c_new = f * c_prev + i * u;
  scalar_t h_new = narrow<scalar_t>(o * tanhf(c_new));
  if (lengths != nullptr && t >= lengths[b]) {
    // Past its length a row keeps its state: h and c are carried through unchanged.
    c_new = c_prev;
    h_new = h[idx];
  }
  c[idx] = c_new;
  h[idx] = h_new;
  out[idx] = h_new;
  if (cell != nullptr) {
    cell[idx] = c_new;
  }
  if (act != nullptr) {
    scalar_t* a = act + b * 6 * H + n;
    a[0] = narrow<scalar_t>(i);
    a[H] = narrow<scalar_t>(f);
    a[2 * H] = narrow<scalar_t>(o);
    a[3 * H] = narrow<scalar_t>(u);
  }
}

// The cell derivatives of step t: dh (in: gradient that reached h_{t+1}; out: that of h_t), dc
// (in: of c_t; out: of c_{t-1}) and dz_t into the first 4H columns of dproj.
template <typename scalar_t>
C10_HOST_DEVICE inline void backward_cell(int64_t idx, int64_t H, const float* rec, float* dh, float* dc,
                                          const scalar_t* dout, const float* dcells, const scalar_t* act,
                                          const float* c, const float* c_prev, scalar_t* dproj,
                                          const int64_t* lengths, int64_t t) {
  const int64_t b = idx / H;
  const int64_t n = idx - b * H;
  const bool has_len = lengths != nullptr;
  const int64_t len = has_len ? lengths[b] : 0;
  float dh_v = dh[idx];
  if (rec != nullptr) {
    // dh reaches h_t through hm_{t+1}; a row that was padding at t+1 passed h_t through unchanged,
    // so the gradient that reached h_{t+1} passes straight back as well.
    dh_v = (has_len && t + 1 >= len) ? rec[idx] + dh_v : rec[idx];
  }
  if (dout != nullptr) {
    dh_v += widen(dout[idx]);
  }
  dh[idx] = dh_v;

  float dc_v = dc[idx];
  if (dcells != nullptr) {
    dc_v += dcells[idx];
  }
  const scalar_t* a = act + b * 6 * H + n;
  const float i = widen(a[0]);
  const float f = widen(a[H]);
  const float o = widen(a[2 * H]);
  const float u = widen(a[3 * H]);
  const float tanh_c = tanhf(c[idx]);
  const float c_prev_v = c_prev[idx];

  float dzi = 0.0f, dzf = 0.0f, dzo = 0.0f, dzu = 0.0f;
  if (!has_len || t < len) {
    dc_v += dh_v * o * (1.0f - tanh_c * tanh_c);
    dzi = dc_v * u * i * (1.0f - i);
    dzf = dc_v * c_prev_v * f * (1.0f - f);
    dzo = dh_v * tanh_c * o * (1.0f - o);
    dzu = dc_v * i * (1.0f - u * u);
    dc[idx] = dc_v * f;
  } else {
    // A padded step is the identity on c: its gradient passes through, its gates get none.
    dc[idx] = dc_v;
  }
  scalar_t* dz = dproj + b * 5 * H + n;
  dz[0] = narrow<scalar_t>(dzi);
  dz[H] = narrow<scalar_t>(dzf);
  dz[2 * H] = narrow<scalar_t>(dzo);
  dz[3 * H] = narrow<scalar_t>(dzu);
}

// From dm = dz_t Wh: dxm = dm * hm (last H columns of dproj) and dhm = dm * xm.
template <typename scalar_t>
C10_HOST_DEVICE inline void backward_m(int64_t idx, int64_t H, const float* dm, const scalar_t* act, scalar_t* dproj,
                                       scalar_t* dhm) {
  const int64_t b = idx / H;
  const int64_t n = idx - b * H;
  const scalar_t* a = act + b * 6 * H + n;
  const float dm_v = dm[idx];
  dproj[b * 5 * H + 4 * H + n] = narrow<scalar_t>(dm_v * widen(a[5 * H]));
  dhm[idx] = narrow<scalar_t>(dm_v * widen(a[4 * H]));
}

// The gradient of the state entering step t_next: rec, plus dh for rows that were padding there.
C10_HOST_DEVICE inline void carry_hidden_gradient(int64_t idx, int64_t H, const float* rec, const float* dh,
                                                  float* out, const int64_t* lengths, int64_t t_next) {
  const int64_t b = idx / H;
  out[idx] = t_next >= lengths[b] ? rec[idx] + dh[idx] : rec[idx];
}

// m = xm * hm of one saved row (idx runs over [T*B, H]).
template <typename scalar_t>
C10_HOST_DEVICE inline void recompute_m(int64_t idx, int64_t H, const scalar_t* act, scalar_t* m) {
  const int64_t r = idx / H;
  const int64_t n = idx - r * H;
  const scalar_t* a = act + r * 6 * H + n;
  m[idx] = narrow<scalar_t>(widen(a[4 * H]) * widen(a[5 * H]));
}

}  // namespace pointwise
}  // namespace fastmlstm
