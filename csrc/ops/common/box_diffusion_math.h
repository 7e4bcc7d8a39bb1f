// DiffusionDet box-diffusion arithmetic shared by the CPU (ops/box_diffusion.cpp) and CUDA
// (ops/cuda/box_diffusion.cu) kernels, in float64 as the official code computes it (its schedule
// buffers are float64). Boxes are 4 doubles: normalised (cx, cy, w, h) in the diffusion space
// mapped to [-scale, scale], or absolute xyxy. Divisions by per-call constants (scale, image size,
// schedule terms) are multiplications by reciprocals computed once: divisions dominated the cost,
// and the difference is at most an ulp.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

namespace fastdiffinst {
namespace diffusion {

// A contiguous floating-point tensor of any storage type, read as float64 element by element. The
// inputs are a few thousand numbers: a converted float64 copy per input (one kernel launch each on
// CUDA, an allocation each on CPU) would cost more than the kernels themselves.
class Float64View {
 public:
  enum class Storage : uint8_t { kDouble, kFloat, kHalf, kBFloat16 };
  Float64View(const void* data, Storage storage) : data_(data), storage_(storage) {}
  C10_HOST_DEVICE double operator[](int64_t i) const {
    switch (storage_) {
      case Storage::kDouble:
        return static_cast<const double*>(data_)[i];
      case Storage::kFloat:
        return static_cast<double>(static_cast<const float*>(data_)[i]);
      case Storage::kHalf:
        return static_cast<double>(static_cast<float>(static_cast<const c10::Half*>(data_)[i]));
      default:
        return static_cast<double>(static_cast<float>(static_cast<const c10::BFloat16*>(data_)[i]));
    }
  }
  // Row `row` of a [..., 4] tensor.
  C10_HOST_DEVICE void row4(int64_t row, double* out) const {
    for (int j = 0; j < 4; ++j) out[j] = (*this)[4 * row + j];
  }
  Storage storage() const { return storage_; }
  const void* data() const { return data_; }

 private:
  const void* data_;
  Storage storage_;
};

// Placeholder boxes: N(0.5, (1/6)^2) per coordinate, sizes at least this. The plain-PyTorch
// references use fastdiffinst/common/diffusion.py PLACEHOLDER_MIN_SIZE; fastdiffinst._C exports this
// one as PLACEHOLDER_MIN_SIZE and tests/test_box_diffusion.py checks that the two agree.
constexpr double kPlaceholderMinSize = 1e-4;

C10_HOST_DEVICE inline double clamp_signal(double v, double scale) {
  // Written so that NaN stays NaN (the CPU kernel rejects non-finite inputs before this).
  return v < -scale ? -scale : (v > scale ? scale : v);
}

// Diffusion-space box -> absolute xyxy: clamp, map to [0, 1], cxcywh -> xyxy, × (w, h, w, h).
C10_HOST_DEVICE inline void signal_to_box(const double* x, const double* whwh, double scale, double* out) {
  const double inv_scale = 1.0 / scale;
  double b[4];
  for (int j = 0; j < 4; ++j) b[j] = (clamp_signal(x[j], scale) * inv_scale + 1.0) * 0.5;
  out[0] = (b[0] - 0.5 * b[2]) * whwh[0];
  out[1] = (b[1] - 0.5 * b[3]) * whwh[1];
  out[2] = (b[0] + 0.5 * b[2]) * whwh[2];
  out[3] = (b[1] + 0.5 * b[3]) * whwh[3];
}

// Absolute xyxy -> diffusion space (x̂0 of the DDIM update): ÷ whwh, xyxy -> cxcywh, ·2 - 1, · scale, clamp.
// `inv_whwh` holds 1 / (w, h, w, h).
C10_HOST_DEVICE inline void box_to_signal(const double* box, const double* inv_whwh, double scale, double* out) {
  double n[4];
  for (int j = 0; j < 4; ++j) n[j] = box[j] * inv_whwh[j];
  const double c[4] = {(n[0] + n[2]) / 2, (n[1] + n[3]) / 2, n[2] - n[0], n[3] - n[1]};
  for (int j = 0; j < 4; ++j) out[j] = clamp_signal((c[j] * 2.0 - 1.0) * scale, scale);
}

// The fake GT box (normalised cxcywh) of an image without GT: the whole image. A function, not a
// constexpr array, because device code cannot read a host array. The plain-PyTorch references use
// fastdiffinst/common/diffusion.py FAKE_GT_BOX; fastdiffinst._C exports this one as FAKE_GT_BOX and
// tests/test_box_diffusion.py checks that the two agree.
C10_HOST_DEVICE inline void fake_gt_box(double* out) {
  out[0] = 0.5;
  out[1] = 0.5;
  out[2] = 1.0;
  out[3] = 1.0;
}

// A placeholder proposal (normalised cxcywh) made from a standard-normal draw.
C10_HOST_DEVICE inline void placeholder_box(const double* draw, double* out) {
  for (int j = 0; j < 4; ++j) out[j] = draw[j] * (1.0 / 6.0) + 0.5;
  out[2] = out[2] < kPlaceholderMinSize ? kPlaceholderMinSize : out[2];
  out[3] = out[3] < kPlaceholderMinSize ? kPlaceholderMinSize : out[3];
}

// The starting box x0 (normalised cxcywh) of a training proposal whose select_index is `select` in
// an image with `gt_count` GT boxes: a placeholder from the slot's draw (select < 0), the fake GT box
// (an image without GT), else GT box `select`. The kernels guard indices differently (the CPU kernel has
// checked them, the CUDA kernel clamps them), so the rows come from callbacks, and only the row the
// branch needs is read: `read_draw(double out[4])`, `read_gt(int64_t select, double out[4])`.
template <typename ReadDraw, typename ReadGt>
C10_HOST_DEVICE inline void start_box(int64_t select, int64_t gt_count, const ReadDraw& read_draw,
                                      const ReadGt& read_gt, double* x0) {
  if (select < 0) {
    double draw[4];
    read_draw(draw);
    placeholder_box(draw, x0);
  } else if (gt_count == 0) {
    fake_gt_box(x0);
  } else {
    read_gt(select, x0);
  }
}

// q(x_t | x0): x_t = sqrt(ᾱ_t)·x0' + sqrt(1 - ᾱ_t)·ε with x0' = (x0·2 - 1)·scale; returned as an
// absolute xyxy box.
C10_HOST_DEVICE inline void q_sample_box(const double* x0, const double* noise, double sqrt_alpha,
                                         double sqrt_one_minus_alpha, double scale, const double* whwh, double* out) {
  double x[4];
  for (int j = 0; j < 4; ++j) x[j] = sqrt_alpha * ((x0[j] * 2.0 - 1.0) * scale) + sqrt_one_minus_alpha * noise[j];
  signal_to_box(x, whwh, scale, out);
}

// Coefficients of one DDIM step from ᾱ_t to ᾱ_next with stochasticity eta.
struct DDIMCoefficients {
  double sqrt_recip_alpha;        // sqrt(1 / ᾱ_t)
  double inv_sqrt_recipm1_alpha;  // 1 / sqrt(1 / ᾱ_t - 1)
  double sqrt_alpha_next;         // sqrt(ᾱ_next)
  double c;                       // sqrt(1 - ᾱ_next - σ²)
  double sigma;                   // η·sqrt((1 - ᾱ_t/ᾱ_next)(1 - ᾱ_next)/(1 - ᾱ_t))
};

C10_HOST_DEVICE inline DDIMCoefficients ddim_coefficients(double alpha, double alpha_next, double eta) {
  DDIMCoefficients k;
  k.sqrt_recip_alpha = sqrt(1.0 / alpha);
  k.inv_sqrt_recipm1_alpha = 1.0 / sqrt(1.0 / alpha - 1.0);
  k.sqrt_alpha_next = sqrt(alpha_next);
  k.sigma = eta * sqrt((1.0 - alpha / alpha_next) * (1.0 - alpha_next) / (1.0 - alpha));
  k.c = sqrt(1.0 - alpha_next - k.sigma * k.sigma);
  return k;
}

// ε̂ = (sqrt(1/ᾱ_t)·x_t - x̂0) / sqrt(1/ᾱ_t - 1), then x_next = sqrt(ᾱ_next)·x̂0 + c·ε̂ + σ·z.
C10_HOST_DEVICE inline void ddim_update(const double* x_t, const double* x0, const double* z, const DDIMCoefficients& k,
                                        double* out) {
  for (int j = 0; j < 4; ++j) {
    const double eps = (k.sqrt_recip_alpha * x_t[j] - x0[j]) * k.inv_sqrt_recipm1_alpha;
    out[j] = x0[j] * k.sqrt_alpha_next + k.c * eps + k.sigma * z[j];
  }
}

}  // namespace diffusion
}  // namespace fastdiffinst
