// fft_crop_plan.cpp -- builds and caches the crop matrices (see fft_crop_plan.h).
#include "fft_crop_plan.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

namespace effkern {
namespace {

using Key = std::tuple<int64_t, int64_t, bool, int, int, int>;

// E and O of AxisOp (see fft_crop_plan.h) from L, in float64.
void fold(AxisOp& op) {
  const int64_t n = op.L.size(0), N = op.L.size(1);
  const double* L = op.L.data_ptr<double>();
  double scale = 0.0;
  for (int64_t i = 0; i < n * N; ++i) scale = std::max(scale, std::abs(L[i]));
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t m = 0; m < N; ++m) {
      const double mirrored = L[((n - a) % n) * N + (N - m) % N];
      TORCH_INTERNAL_ASSERT(std::abs(L[a * N + m] - mirrored) <= 1e-12 * scale + 1e-300,
                            "fft_crop: crop matrix is not reversal-symmetric");
    }
  }
  const int64_t ne = n / 2 + 1, Ne = N / 2 + 1, no = (n - 1) / 2, No = (N - 1) / 2;
  auto opts = at::TensorOptions().dtype(at::kDouble);
  op.E = at::empty({ne, Ne}, opts);
  op.O = at::empty({no, No}, opts);
  double* E = op.E.data_ptr<double>();
  double* O = op.O.data_ptr<double>();
  for (int64_t a = 0; a < ne; ++a) {
    for (int64_t j = 0; j < Ne; ++j) {
      const bool self_mirror = j == 0 || 2 * j == N;
      E[a * Ne + j] = self_mirror ? L[a * N + j] : 0.5 * (L[a * N + j] + L[a * N + N - j]);
    }
  }
  for (int64_t a = 1; a <= no; ++a) {
    for (int64_t j = 1; j <= No; ++j) O[(a - 1) * No + j - 1] = 0.5 * (L[a * N + j] - L[a * N + N - j]);
  }
}

AxisOp build(int64_t n_in, int64_t n_out, bool adjoint) {
  const double pi = 3.14159265358979323846;
  auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor ar = at::empty({n_out, n_in}, opts);
  double* a_ptr = ar.data_ptr<double>();
  // sum_{k=k_lo}^{k_lo+n-1} cos(k theta) = cos(c theta) sin(n theta / 2) / sin(theta / 2),
  // c = k_lo + (n-1)/2 the centre of the kept band (Dirichlet kernel); n at theta = 0.
  const int64_t k_lo = -(n_out / 2);
  const double centre = static_cast<double>(k_lo) + 0.5 * static_cast<double>(n_out - 1);
  for (int64_t a = 0; a < n_out; ++a) {
    for (int64_t m = 0; m < n_in; ++m) {
      // theta reduced modulo 2 pi in exact integer arithmetic: a/n - m/N = (a N - m n) / (n N)
      const int64_t num = (a * n_in - m * n_out) % (n_out * n_in);
      double acc;
      if (num == 0) {
        acc = static_cast<double>(n_out);
      } else {
        const double theta = 2.0 * pi * static_cast<double>(num) / static_cast<double>(n_out * n_in);
        acc = std::cos(centre * theta) * std::sin(0.5 * static_cast<double>(n_out) * theta) / std::sin(0.5 * theta);
      }
      a_ptr[a * n_in + m] = acc / static_cast<double>(n_in);
    }
  }
  AxisOp op;
  at::Tensor u, v;
  if (n_out % 2 == 0) {
    u = at::empty({n_out}, opts);
    v = at::empty({n_in}, opts);
    for (int64_t a = 0; a < n_out; ++a) u.data_ptr<double>()[a] = (a % 2 == 0 ? 1.0 : -1.0) / static_cast<double>(n_in);
    for (int64_t m = 0; m < n_in; ++m) {
      const int64_t num = (n_out * m) % (2 * n_in);  // sin(pi n m / N), argument reduced mod 2 pi
      v.data_ptr<double>()[m] = std::sin(pi * static_cast<double>(num) / static_cast<double>(n_in));
    }
  }
  if (adjoint) {
    op.L = ar.t().contiguous();
    if (u.defined()) { op.lu = v; op.lv = u; }
  } else {
    op.L = ar;
    if (u.defined()) { op.lu = u; op.lv = v; }
  }
  fold(op);
  return op;
}

}  // namespace

const AxisOp& crop_axis(int64_t n_in, int64_t n_out, bool adjoint, at::ScalarType dtype, at::Device device) {
  static std::mutex mutex;
  static std::map<Key, std::unique_ptr<AxisOp>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const Key key{n_in, n_out, adjoint, static_cast<int>(dtype), static_cast<int>(device.type()),
                static_cast<int>(device.index())};
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;
  const Key base_key{n_in, n_out, adjoint, static_cast<int>(at::kDouble), static_cast<int>(at::kCPU), -1};
  auto base_it = cache.find(base_key);
  if (base_it == cache.end()) {
    base_it = cache.emplace(base_key, std::make_unique<AxisOp>(build(n_in, n_out, adjoint))).first;
  }
  if (key == base_key) return *base_it->second;
  const AxisOp& base = *base_it->second;
  auto opts = at::TensorOptions().dtype(dtype).device(device);
  auto op = std::make_unique<AxisOp>();
  op->L = base.L.to(opts).contiguous();
  op->E = base.E.to(opts).contiguous();
  op->O = base.O.to(opts).contiguous();
  if (base.has_imag()) {
    op->lu = base.lu.to(opts).contiguous();
    op->lv = base.lv.to(opts).contiguous();
  }
  return *cache.emplace(key, std::move(op)).first->second;
}

}  // namespace effkern
