// CPU kernel of paste_masks: DiffusionInst's mask post-processing (aligned upsampling by the mask
// stride, crop, bilinear resize, threshold, box clip) per output pixel, computed only inside each
// instance's box; nothing of size n × H × W exists but the bool result. Arithmetic in
// ops/common/paste_masks_math.h, shared with the CUDA kernel. Parallel over (instance, row).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "ops/common/paste_masks_math.h"
#include "ops/paste_masks_host.h"

namespace fastdiffinst {
namespace {

at::Tensor paste_masks_cpu(const at::Tensor& mask_probs, const at::Tensor& boxes, int64_t image_h, int64_t image_w,
                           int64_t out_h, int64_t out_w, double threshold, int64_t mask_stride) {
  check_paste_masks_inputs(mask_probs, boxes, image_h, image_w, out_h, out_w, threshold, mask_stride);
  const int64_t n = mask_probs.size(0), hm = mask_probs.size(1), wm = mask_probs.size(2);
  auto output = at::empty({n, out_h, out_w}, mask_probs.options().dtype(at::kBool));
  if (output.numel() == 0) return output;
  const auto p = mask_probs.contiguous();
  const auto b = boxes.to(at::kDouble).contiguous();
  const double* box = b.data_ptr<double>();
  for (int64_t k = 0; k < 4 * n; ++k)
    TORCH_CHECK(std::isfinite(box[k]), "paste_masks: boxes must be finite, got ", box[k], " in boxes[", k / 4, "]");

  // Per-axis sampling plans, shared by every instance: output index -> full-resolution taps,
  // full-resolution index -> mask-stride taps.
  const bool resize = out_h != image_h || out_w != image_w;
  std::vector<paste::Tap> up_rows(image_h), up_cols(image_w), rows(out_h), cols(out_w);
  for (int64_t i = 0; i < image_h; ++i) up_rows[i] = paste::upsample_tap(i, mask_stride, hm);
  for (int64_t j = 0; j < image_w; ++j) up_cols[j] = paste::upsample_tap(j, mask_stride, wm);
  for (int64_t y = 0; y < out_h; ++y) rows[y] = resize ? paste::resize_tap(y, image_h, out_h) : paste::Tap{y, y, 0.f};
  for (int64_t x = 0; x < out_w; ++x) cols[x] = resize ? paste::resize_tap(x, image_w, out_w) : paste::Tap{x, x, 0.f};
  const float t = static_cast<float>(threshold);
  const float* P = p.data_ptr<float>();
  bool* out = output.data_ptr<bool>();

  at::parallel_for(0, n * out_h, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t inst = task / out_h, y = task % out_h;
      bool* row = out + task * out_w;
      const double* corners = box + 4 * inst;
      int64_t x1, x2, y1, y2;
      paste::box_span(corners[0], corners[2], out_w, &x1, &x2);
      paste::box_span(corners[1], corners[3], out_h, &y1, &y2);
      if (y < y1 || y >= y2 || x1 >= x2) {
        std::memset(row, 0, out_w);
        continue;
      }
      std::memset(row, 0, x1);
      std::memset(row + x2, 0, out_w - x2);
      const float* map = P + inst * hm * wm;
      const paste::Tap ry = rows[y];
      const paste::Tap a0 = up_rows[ry.i0], a1 = up_rows[ry.i1];
      for (int64_t x = x1; x < x2; ++x) {
        const paste::Tap cx = cols[x];
        const float value = resize ? paste::resized(map, wm, ry, a0, a1, cx, up_cols[cx.i0], up_cols[cx.i1])
                                   : paste::upsampled(map, wm, a0, up_cols[x]);
        row[x] = value > t;
      }
    }
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiffinst, CPU, m) { m.impl("paste_masks", TORCH_FN(paste_masks_cpu)); }

}  // namespace fastdiffinst
