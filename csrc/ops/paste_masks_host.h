// Host-side argument checks of paste_masks shared by the CPU and CUDA kernels (the Python layer
// checks the same first, with friendlier messages; these keep the native op memory-safe when it
// is called directly through torch.ops).
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace fastdiffinst {

inline void check_paste_masks_inputs(const at::Tensor& probs, const at::Tensor& boxes, int64_t image_h, int64_t image_w,
                                     int64_t out_h, int64_t out_w, double threshold) {
  constexpr const char* op = "paste_masks";
  TORCH_CHECK(probs.dim() == 3, op, ": probs must be [n, Hm, Wm], got ", probs.sizes());
  TORCH_CHECK(probs.scalar_type() == at::kFloat, op, ": probs must be float32, got ", probs.scalar_type());
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(0) == probs.size(0) && boxes.size(1) == 4, op,
              ": boxes must be [n, 4] with n = ", probs.size(0), ", got ", boxes.sizes());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), op, ": boxes must be floating point, got ", boxes.scalar_type());
  TORCH_CHECK(boxes.device() == probs.device(), op, ": boxes are on ", boxes.device(), " but probs on ",
              probs.device());
  TORCH_CHECK(image_h > 0 && image_w > 0 && out_h > 0 && out_w > 0, op,
              ": image and output sizes must be positive, got ", image_h, "x", image_w, " and ", out_h, "x", out_w);
  TORCH_CHECK(probs.size(0) == 0 || (probs.size(1) > 0 && probs.size(2) > 0 && 4 * probs.size(1) >= image_h &&
                                     4 * probs.size(2) >= image_w),
              op, ": a ", probs.size(1), "x", probs.size(2), " stride-4 map does not cover a ", image_h, "x", image_w,
              " image");
  TORCH_CHECK(std::isfinite(threshold), op, ": threshold must be finite, got ", threshold);
}

}  // namespace fastdiffinst
