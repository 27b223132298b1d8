// fft_lanes_plan.cpp -- builds and caches the per-axis plans of the FFT path
// (radix factorisation, twiddle tables, the bin map of the kept band); see
// fft_lanes.h for the math.
#include "cpu/fft_lanes.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <utility>

namespace effkern::fft_lanes {
namespace {

constexpr double kPi = 3.14159265358979323846;

int64_t mod(int64_t a, int64_t n) { return ((a % n) + n) % n; }

// Radices in the order the stages use them: 8s, a 4 or 2, then odd primes
// ascending (fewest passes over the block).
std::vector<int> factorise(int64_t N) {
  if (N < 1) throw std::invalid_argument("fft_lanes: transform length must be >= 1");
  std::vector<int> radices;
  while (N % 8 == 0) { radices.push_back(8); N /= 8; }
  while (N % 4 == 0) { radices.push_back(4); N /= 4; }
  if (N % 2 == 0) { radices.push_back(2); N /= 2; }
  for (int64_t p = 3; N > 1; p += 2) {
    if (p * p > N) { radices.push_back(static_cast<int>(N)); break; }
    while (N % p == 0) { radices.push_back(static_cast<int>(p)); N /= p; }
  }
  return radices;
}

// exp(2 pi i num / den) with the argument reduced in integers first.
std::pair<double, double> root(int64_t num, int64_t den) {
  const double angle = 2.0 * kPi * static_cast<double>(mod(num, den)) / static_cast<double>(den);
  return {std::cos(angle), std::sin(angle)};
}

template <typename T>
Transform<T> build_transform(int64_t N, int sign) {
  Transform<T> tr;
  tr.N = N;
  tr.sign = sign;
  int64_t n = N, s = 1;
  for (int p : factorise(N)) {
    Stage<T> st;
    st.radix = p;
    st.n = n;
    st.s = s;
    st.m = n / p;
    st.tw_re.resize(st.m * (p - 1));
    st.tw_im.resize(st.m * (p - 1));
    for (int64_t j = 0; j < st.m; ++j) {
      for (int t = 1; t < p; ++t) {
        auto [c, sn] = root(j * t, n);
        st.tw_re[j * (p - 1) + t - 1] = static_cast<T>(c);
        st.tw_im[j * (p - 1) + t - 1] = static_cast<T>(sign * sn);
      }
    }
    if (p % 2 == 1) {
      st.cos_k.resize(p);
      st.sin_k.resize(p);
      for (int k = 0; k < p; ++k) {
        auto [c, sn] = root(k, p);
        st.cos_k[k] = static_cast<T>(c);
        st.sin_k[k] = static_cast<T>(sign * sn);
      }
    }
    tr.stages.push_back(std::move(st));
    n /= p;
    s *= p;
  }
  return tr;
}

template <typename T>
AxisPlan<T> build_axis(int64_t n_in, int64_t n_out) {
  AxisPlan<T> ax;
  ax.n_in = n_in;
  ax.n_out = n_out;
  ax.identity = n_in == n_out;
  ax.scale = static_cast<T>(1.0 / static_cast<double>(std::max(n_in, n_out)));
  if (ax.identity) {
    ax.scale = 1;
    return ax;
  }
  ax.forward = build_transform<T>(n_in, -1);
  ax.inverse = build_transform<T>(n_out, +1);
  const bool crop = n_out < n_in;
  const int64_t n = std::min(n_in, n_out);
  std::vector<BinTerm<T>> terms;
  for (int64_t k = -(n / 2); k <= (n + 1) / 2 - 1; ++k) {
    const bool unpaired = n % 2 == 0 && k == -(n / 2);
    if (!unpaired) {
      terms.push_back({mod(k, n_in), mod(k, n_out), T(1), false});
    } else if (crop) {  // Hermitian mean of the two input bins +-n/2
      terms.push_back({mod(k, n_in), mod(k, n_out), T(0.5), false});
      terms.push_back({mod(-k, n_in), mod(k, n_out), T(0.5), false});
    } else {  // split the short grid's Nyquist bin onto +-n/2
      terms.push_back({mod(k, n_in), mod(k, n_out), T(0.5), false});
      terms.push_back({mod(k, n_in), mod(-k, n_out), T(0.5), false});
    }
  }
  std::stable_sort(terms.begin(), terms.end(), [](const BinTerm<T>& a, const BinTerm<T>& b) { return a.dst < b.dst; });
  std::vector<bool> hit(n_out, false);
  for (auto& term : terms) {
    term.assign = !hit[term.dst];
    hit[term.dst] = true;
  }
  for (int64_t r = 0; r < n_out; ++r) {
    if (!hit[r]) ax.zero_rows.push_back(r);
  }
  ax.bins = std::move(terms);
  return ax;
}

// Flops per complex element of one radix-p stage (butterfly + twiddle), roughly;
// the generic radix is an O(p^2) sum.  With the rule in fft_crop_cpu.cpp these
// weights pick the faster path for every shape of the check in docs/benchmarks.md
// (small primes 11..17 included, where the FFT still wins).
double stage_flops(int p) {
  switch (p) {
    case 2: return 5.0;
    case 4: return 8.5;
    case 8: return 12.5;
    case 3: return 9.0;
    case 5: return 12.0;
    case 7: return 15.0;
    default: return 4.0 * p + 6.0;
  }
}

}  // namespace

template <typename T>
const AxisPlan<T>& axis_plan(int64_t n_in, int64_t n_out) {
  static std::mutex mutex;
  static std::map<std::pair<int64_t, int64_t>, std::unique_ptr<AxisPlan<T>>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = cache[{n_in, n_out}];
  if (!slot) slot = std::make_unique<AxisPlan<T>>(build_axis<T>(n_in, n_out));
  return *slot;
}

template const AxisPlan<float>& axis_plan<float>(int64_t, int64_t);
template const AxisPlan<double>& axis_plan<double>(int64_t, int64_t);

double transform_flops(int64_t N) {
  double per_element = 0.0;
  for (int p : factorise(N)) per_element += stage_flops(p);
  return per_element * static_cast<double>(N);
}

}  // namespace effkern::fft_lanes
