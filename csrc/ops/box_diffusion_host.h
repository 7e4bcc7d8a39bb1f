// Host-side argument checks and input preparation shared by the CPU and CUDA box-diffusion kernels.
// The Python layer checks the same things first with friendlier messages; these keep the native
// ops memory-safe when called directly through torch.ops.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "ops/common/box_diffusion_math.h"

namespace fastdiffinst {

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ", t.scalar_type());
}

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the boxes on ", ref.device());
}

// A floating-point input read by the kernels as float64 (they compute in float64): the tensor itself
// when contiguous, in float64, float32, float16 or bfloat16 storage; otherwise a contiguous copy
// (a float64 one for the other floating types).
class Float64Input {
 public:
  explicit Float64Input(const at::Tensor& t)
      : tensor_(readable(t)), view_(tensor_.const_data_ptr(), storage(tensor_)) {}
  const diffusion::Float64View& view() const { return view_; }
  const at::Tensor& tensor() const { return tensor_; }

 private:
  using Storage = diffusion::Float64View::Storage;
  static bool viewable(at::ScalarType type) {
    return type == at::kDouble || type == at::kFloat || type == at::kHalf || type == at::kBFloat16;
  }
  static at::Tensor readable(const at::Tensor& t) {
    return viewable(t.scalar_type()) ? t.contiguous() : t.to(at::kDouble).contiguous();
  }
  static Storage storage(const at::Tensor& t) {
    switch (t.scalar_type()) {
      case at::kFloat:
        return Storage::kFloat;
      case at::kHalf:
        return Storage::kHalf;
      case at::kBFloat16:
        return Storage::kBFloat16;
      default:
        return Storage::kDouble;
    }
  }
  at::Tensor tensor_;
  diffusion::Float64View view_;
};

struct QSampleSizes {
  int64_t batch, max_gt, proposals, timesteps;
};

inline void check_scale(double scale, const char* op) {
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": scale must be positive and finite, got ", scale);
}

inline QSampleSizes check_q_sample_inputs(const at::Tensor& gt_boxes, const at::Tensor& gt_counts, const at::Tensor& t,
                                          const at::Tensor& noise, const at::Tensor& placeholder_noise,
                                          const at::Tensor& select_index, const at::Tensor& sqrt_alphas_cumprod,
                                          const at::Tensor& sqrt_one_minus_alphas_cumprod, double scale,
                                          const at::Tensor& images_whwh) {
  constexpr const char* op = "q_sample_boxes";
  check_scale(scale, op);
  TORCH_CHECK(gt_boxes.dim() == 3 && gt_boxes.size(2) == 4, op, ": gt_boxes must be [B, G, 4], got ", gt_boxes.sizes());
  TORCH_CHECK(noise.dim() == 3 && noise.size(2) == 4, op, ": noise must be [B, N, 4], got ", noise.sizes());
  const QSampleSizes s{gt_boxes.size(0), gt_boxes.size(1), noise.size(1), sqrt_alphas_cumprod.numel()};
  check_shape(gt_counts, {s.batch}, op, "gt_counts");
  check_shape(t, {s.batch}, op, "t");
  check_shape(noise, {s.batch, s.proposals, 4}, op, "noise");
  check_shape(placeholder_noise, {s.batch, s.proposals, 4}, op, "placeholder_noise");
  check_shape(select_index, {s.batch, s.proposals}, op, "select_index");
  TORCH_CHECK(sqrt_alphas_cumprod.dim() == 1 && s.timesteps > 0, op,
              ": sqrt_alphas_cumprod must be a non-empty [T] schedule, got ", sqrt_alphas_cumprod.sizes());
  check_shape(sqrt_one_minus_alphas_cumprod, {s.timesteps}, op, "sqrt_one_minus_alphas_cumprod");
  check_shape(images_whwh, {s.batch, 4}, op, "images_whwh");
  TORCH_CHECK(gt_counts.scalar_type() == at::kLong && t.scalar_type() == at::kLong &&
                  select_index.scalar_type() == at::kLong,
              op, ": gt_counts, t and select_index must be int64");
  for (const auto* x :
       {&gt_boxes, &noise, &placeholder_noise, &sqrt_alphas_cumprod, &sqrt_one_minus_alphas_cumprod, &images_whwh})
    check_float(*x, op, "gt_boxes, noise, placeholder_noise, the schedule and images_whwh");
  for (const auto* x : {&gt_counts, &t, &noise, &placeholder_noise, &select_index, &sqrt_alphas_cumprod,
                        &sqrt_one_minus_alphas_cumprod, &images_whwh})
    check_device(*x, gt_boxes, op, "an input");
  return s;
}

inline void check_ddim_inputs(const at::Tensor& x_t, const at::Tensor& pred_boxes, const at::Tensor& images_whwh,
                              const at::Tensor& keep, int64_t t, int64_t t_next, const at::Tensor& alphas_cumprod,
                              double eta, double scale, const at::Tensor& noise, const at::Tensor& renew_noise) {
  constexpr const char* op = "ddim_step_boxes";
  check_scale(scale, op);
  TORCH_CHECK(std::isfinite(eta) && eta >= 0, op, ": eta must be finite and >= 0, got ", eta);
  TORCH_CHECK(x_t.dim() == 3 && x_t.size(2) == 4, op, ": x_t must be [B, N, 4], got ", x_t.sizes());
  const int64_t batch = x_t.size(0), proposals = x_t.size(1), timesteps = alphas_cumprod.numel();
  check_shape(pred_boxes, x_t.sizes(), op, "pred_boxes");
  check_shape(noise, x_t.sizes(), op, "noise");
  check_shape(renew_noise, x_t.sizes(), op, "renew_noise");
  check_shape(keep, {batch, proposals}, op, "keep");
  check_shape(images_whwh, {batch, 4}, op, "images_whwh");
  TORCH_CHECK(alphas_cumprod.dim() == 1, op, ": alphas_cumprod must be [T], got ", alphas_cumprod.sizes());
  TORCH_CHECK(keep.scalar_type() == at::kBool, op, ": keep must be bool, got ", keep.scalar_type());
  for (const auto* x : {&x_t, &pred_boxes, &images_whwh, &alphas_cumprod, &noise, &renew_noise})
    check_float(*x, op, "x_t, pred_boxes, images_whwh, alphas_cumprod and the noises");
  for (const auto* x : {&pred_boxes, &images_whwh, &keep, &alphas_cumprod, &noise, &renew_noise})
    check_device(*x, x_t, op, "an input");
  TORCH_CHECK(t >= 0 && t < timesteps, op, ": t must be in [0, ", timesteps, "), got ", t);
  TORCH_CHECK(t_next < t, op, ": t_next must be smaller than t (", t, "), got ", t_next);
  TORCH_CHECK(t_next >= -1, op, ": t_next must be >= -1 (-1 = the final step), got ", t_next);
}

// Registers one device's kernels of the two box-diffusion ops.
template <auto QSampleBoxes, auto DDIMStepBoxes>
void register_box_diffusion_kernels(torch::Library& m) {
  m.impl("q_sample_boxes", TORCH_FN(QSampleBoxes));
  m.impl("ddim_step_boxes", TORCH_FN(DDIMStepBoxes));
}

}  // namespace fastdiffinst
