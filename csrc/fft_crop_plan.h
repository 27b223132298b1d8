// fft_crop_plan.h -- the real matrices of the Fourier low-frequency crop.
//
// One axis of the crop (input length N -> output length n) keeps the
// frequencies K = {-floor(n/2), ..., ceil(n/2)-1}:
//   A[a, m] = (1/N) sum_{k in K} exp(2 pi i k (a/n - m/N))   (n x N, complex)
// Ar = Re(A) is dense; Im(A) is zero for odd n and rank one for even n (only the
// unpaired frequency -n/2 contributes): Im(A) = u v^T, u[a] = (-1)^a / N,
// v[m] = sin(pi n m / N).  The 2-D crop of a real image X is therefore
//   Y = Re(A_h X A_w^T) = Ar_h X Ar_w^T - u_h (v_h^T X v_w) u_w^T,
// two real matrix products plus a rank-one correction.  The adjoint (backward)
// has the same shape with the roles swapped:
//   dX = Ar_h^T dY Ar_w - v_h (u_h^T dY u_w) v_w^T.
// An AxisOp holds one axis of either direction: out = L in, with the rank-one
// factors (lu: output side, lv: input side).  Plans are built in float64 on the
// CPU and cached per (N, n, adjoint, dtype, device).
#pragma once

#include <ATen/core/Tensor.h>

namespace effkern {

struct AxisOp {
  at::Tensor L;   // (n_out, n_in), contiguous
  at::Tensor lu;  // (n_out,) or undefined when the imaginary part is zero
  at::Tensor lv;  // (n_in,)  or undefined
  // L commutes with index reversal (L[-a, -m] = L[a, m], indices mod n_out / n_in),
  // so it splits into an even and an odd half (the CPU kernel uses these):
  //   fold   xe[j] = x[j] + x[-j] (j = 1 .. ceil(N/2)-1; xe[0] = x[0], xe[N/2] = x[N/2]),
  //          xo[j] = x[j] - x[-j] (j = 1 .. floor((N-1)/2))
  //   ye = E xe  (rows a = 0 .. floor(n/2)),  yo = O xo  (rows a = 1 .. floor((n-1)/2))
  //   unfold y[a] = ye[a] + yo[a], y[-a] = ye[a] - yo[a]
  // which halves the multiply-adds of L x.
  at::Tensor E;   // (floor(n/2)+1, floor(N/2)+1)
  at::Tensor O;   // (floor((n-1)/2), floor((N-1)/2))
  bool has_imag() const { return lu.defined(); }
};

// Forward (crop) axis: n_in -> n_out with n_out <= n_in.  adjoint=true gives the
// transpose map n_out -> n_in (L = Ar^T, lu = v, lv = u).
const AxisOp& crop_axis(int64_t n_in, int64_t n_out, bool adjoint, at::ScalarType dtype, at::Device device);

}  // namespace effkern
