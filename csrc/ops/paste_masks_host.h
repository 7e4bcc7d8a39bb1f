// Host-side argument checks of paste_masks shared by the CPU and CUDA kernels (the Python layer
// checks the same first, with friendlier messages; these keep the native op memory-safe when it
// is called directly through torch.ops).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace fastdiffinst {

inline void check_paste_masks_inputs(const at::Tensor& mask_probs, const at::Tensor& boxes, int64_t image_h,
                                     int64_t image_w, int64_t out_h, int64_t out_w, double threshold,
                                     int64_t mask_stride) {
  constexpr const char* op = "paste_masks";
  TORCH_CHECK(mask_probs.dim() == 3, op, ": mask_probs must be [n, Hm, Wm], got ", mask_probs.sizes());
  TORCH_CHECK(mask_probs.scalar_type() == at::kFloat, op, ": mask_probs must be float32, got ",
              mask_probs.scalar_type());
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(0) == mask_probs.size(0) && boxes.size(1) == 4, op,
              ": boxes must be [n, 4] with n = ", mask_probs.size(0), ", got ", boxes.sizes());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), op, ": boxes must be floating point, got ", boxes.scalar_type());
  TORCH_CHECK(boxes.device() == mask_probs.device(), op, ": boxes are on ", boxes.device(), " but mask_probs on ",
              mask_probs.device());
  TORCH_CHECK(image_h > 0 && image_w > 0 && out_h > 0 && out_w > 0, op,
              ": image and output sizes must be positive, got ", image_h, "x", image_w, " and ", out_h, "x", out_w);
  // Bounded so that mask_stride · Hm and mask_stride · Wm (paste::upsample_tap) cannot overflow.
  const int64_t longest = std::max<int64_t>({mask_probs.size(1), mask_probs.size(2), 1});
  TORCH_CHECK(mask_stride >= 1 && mask_stride <= std::numeric_limits<int64_t>::max() / longest, op,
              ": mask_stride must be a positive int (the upsampling factor), got ", mask_stride);
  // ceil(h / mask_stride) <= Hm, written without the product.
  TORCH_CHECK(mask_probs.size(0) == 0 || (mask_probs.size(1) > 0 && mask_probs.size(2) > 0 &&
                                          (image_h - 1) / mask_stride < mask_probs.size(1) &&
                                          (image_w - 1) / mask_stride < mask_probs.size(2)),
              op, ": a ", mask_probs.size(1), "x", mask_probs.size(2), " stride-", mask_stride,
              " map does not cover a ", image_h, "x", image_w, " image");
  TORCH_CHECK(std::isfinite(threshold), op, ": threshold must be finite, got ", threshold);
}

}  // namespace fastdiffinst
