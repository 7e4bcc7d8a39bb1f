// CUDA kernel of paste_masks: one thread per output pixel, the arithmetic of the CPU kernel
// (ops/common/paste_masks_math.h). Pixels outside the instance's box are written false without
// reading the map. Fixed shapes, no host synchronisation: non-finite box corners clip nothing
// useful but stay memory-safe (their spans clamp to the output), unless
// fastdiffinst.ops.set_input_checks(True) rejects them first.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/common/paste_masks_math.h"
#include "ops/paste_masks_host.h"

namespace fastdiffinst {
namespace {

constexpr int kThreads = 256;

__global__ void paste_masks_kernel(const float* __restrict__ mask_probs, const double* __restrict__ boxes, int64_t n,
                                   int64_t hm, int64_t wm, int64_t image_h, int64_t image_w, int64_t out_h,
                                   int64_t out_w, float threshold, int64_t mask_stride, bool* __restrict__ out) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= n * out_h * out_w) return;
  const int64_t x = k % out_w, y = (k / out_w) % out_h, inst = k / (out_w * out_h);
  const double* corners = boxes + 4 * inst;
  int64_t x1, x2, y1, y2;
  paste::box_span(corners[0], corners[2], out_w, &x1, &x2);
  paste::box_span(corners[1], corners[3], out_h, &y1, &y2);
  if (x < x1 || x >= x2 || y < y1 || y >= y2) {
    out[k] = false;
    return;
  }
  const float* map = mask_probs + inst * hm * wm;
  float value;
  if (out_h == image_h && out_w == image_w) {
    value = paste::upsampled(map, wm, paste::upsample_tap(y, mask_stride, hm), paste::upsample_tap(x, mask_stride, wm));
  } else {
    const paste::Tap ry = paste::resize_tap(y, image_h, out_h), cx = paste::resize_tap(x, image_w, out_w);
    value = paste::resized(map, wm, ry, paste::upsample_tap(ry.i0, mask_stride, hm),
                           paste::upsample_tap(ry.i1, mask_stride, hm), cx, paste::upsample_tap(cx.i0, mask_stride, wm),
                           paste::upsample_tap(cx.i1, mask_stride, wm));
  }
  out[k] = value > threshold;
}

at::Tensor paste_masks_cuda(const at::Tensor& mask_probs, const at::Tensor& boxes, int64_t image_h, int64_t image_w,
                            int64_t out_h, int64_t out_w, double threshold, int64_t mask_stride) {
  check_paste_masks_inputs(mask_probs, boxes, image_h, image_w, out_h, out_w, threshold, mask_stride);
  const c10::cuda::CUDAGuard guard(mask_probs.device());
  const int64_t n = mask_probs.size(0);
  auto output = at::empty({n, out_h, out_w}, mask_probs.options().dtype(at::kBool));
  const int64_t total = output.numel();
  if (total == 0) return output;
  const auto p = mask_probs.contiguous();
  const auto b = boxes.to(at::kDouble).contiguous();
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  paste_masks_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      p.data_ptr<float>(), b.data_ptr<double>(), n, mask_probs.size(1), mask_probs.size(2), image_h, image_w, out_h,
      out_w, static_cast<float>(threshold), mask_stride, output.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiffinst, CUDA, m) { m.impl("paste_masks", TORCH_FN(paste_masks_cuda)); }

}  // namespace fastdiffinst
