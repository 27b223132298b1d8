// C++ test of the operator library built by CMake: calls effkern::fft_crop and
// fft_crop_backward through the dispatcher (as any C++/TorchScript user would)
// and compares with a float64 torch::fft oracle; checks the adjoint identity
// <crop(x), g> == <x, crop^T(g)>, the fused normalisation and a bad size.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const char* what, double value) {
  std::printf("%s %-48s %.3e\n", ok ? "ok  " : "FAIL", what, value);
  if (!ok) ++failures;
}

torch::Tensor fft_crop(const torch::Tensor& x, std::vector<int64_t> size, std::optional<torch::Tensor> mean = {},
                       std::optional<torch::Tensor> std = {}) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("effkern::fft_crop", "")
                       .typed<at::Tensor(const at::Tensor&, at::IntArrayRef, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&)>();
  return op.call(x, size, mean, std);
}

torch::Tensor fft_crop_backward(const torch::Tensor& g, std::vector<int64_t> input_size) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("effkern::fft_crop_backward", "")
                       .typed<at::Tensor(const at::Tensor&, at::IntArrayRef, const std::optional<at::Tensor>&)>();
  return op.call(g, input_size, std::nullopt);
}

// EfficientTrain's definition: fftshift, centre crop, ifftshift, ifft2, real part, rescale.
torch::Tensor oracle(const torch::Tensor& x, int64_t h, int64_t w) {
  const int64_t H = x.size(2), W = x.size(3);
  auto spec = torch::fft::fftshift(torch::fft::fft2(x.to(torch::kDouble)), std::vector<int64_t>{-2, -1});
  auto crop = spec.narrow(2, H / 2 - h / 2, h).narrow(3, W / 2 - w / 2, w);
  auto y = torch::real(torch::fft::ifft2(torch::fft::ifftshift(crop, std::vector<int64_t>{-2, -1})));
  return y * static_cast<double>(h * w) / static_cast<double>(H * W);
}

double rel_err(const torch::Tensor& out, const torch::Tensor& ref) {
  return (out.to(torch::kDouble) - ref).norm().item<double>() / ref.norm().item<double>();
}

}  // namespace

int main() {
  torch::manual_seed(0);
  const std::vector<std::vector<int64_t>> shapes = {{2, 3, 224, 224, 160, 160}, {3, 1, 9, 7, 5, 3},
                                                    {1, 2, 8, 10, 8, 1},       {2, 2, 6, 6, 6, 6}};
  for (const auto& s : shapes) {
    for (auto dtype : {torch::kFloat, torch::kDouble}) {
      auto x = torch::randn({s[0], s[1], s[2], s[3]}, torch::dtype(dtype));
      auto y = fft_crop(x, {s[4], s[5]});
      char what[96];
      std::snprintf(what, sizeof what, "fft_crop %ldx%ld->%ldx%ld %s", (long)s[2], (long)s[3], (long)s[4],
                    (long)s[5], dtype == torch::kFloat ? "f32" : "f64");
      const double err = rel_err(y, oracle(x, s[4], s[5]));
      expect(err < (dtype == torch::kFloat ? 1e-5 : 1e-12), what, err);
      auto g = torch::randn_like(y);
      auto dx = fft_crop_backward(g, {s[2], s[3]});
      const double lhs = (y.to(torch::kDouble) * g.to(torch::kDouble)).sum().item<double>();
      const double rhs = (x.to(torch::kDouble) * dx.to(torch::kDouble)).sum().item<double>();
      const double adj = std::abs(lhs - rhs) / (std::abs(lhs) + 1e-30);
      expect(adj < (dtype == torch::kFloat ? 1e-4 : 1e-10), "  adjoint identity", adj);
    }
  }
  // uint8 + fused normalisation
  auto xu8 = torch::randint(0, 256, {2, 3, 33, 30}, torch::kByte);
  auto mean = torch::tensor({0.485, 0.456, 0.406}, torch::kFloat);
  auto stdv = torch::tensor({0.229, 0.224, 0.225}, torch::kFloat);
  auto ref = (oracle(xu8.to(torch::kDouble) / 255.0, 17, 16) - mean.to(torch::kDouble).view({3, 1, 1})) /
             stdv.to(torch::kDouble).view({3, 1, 1});
  const double err = rel_err(fft_crop(xu8, {17, 16}, mean, stdv), ref);
  expect(err < 1e-5, "fft_crop uint8 + (x/255 - mean)/std", err);
  // bad input is a clear error, not a crash
  bool threw = false;
  try {
    fft_crop(torch::randn({1, 1, 8, 8}), {9, 4});
  } catch (const c10::Error&) {
    threw = true;
  }
  expect(threw, "size larger than the input raises", 0.0);
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
