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

__global__ void paste_masks_kernel(const float* __restrict__ probs, const double* __restrict__ boxes, int64_t n,
                                   int64_t hm, int64_t wm, int64_t image_h, int64_t image_w, int64_t out_h,
                                   int64_t out_w, float threshold, bool* __restrict__ out) {
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
  const float* map = probs + inst * hm * wm;
  float value;
  if (out_h == image_h && out_w == image_w) {
    value = paste::upsampled(map, wm, paste::upsample_tap(y, 4, hm), paste::upsample_tap(x, 4, wm));
  } else {
    const paste::Tap ry = paste::resize_tap(y, image_h, out_h), cx = paste::resize_tap(x, image_w, out_w);
    const paste::Tap a0 = paste::upsample_tap(ry.i0, 4, hm), a1 = paste::upsample_tap(ry.i1, 4, hm);
    const paste::Tap b0 = paste::upsample_tap(cx.i0, 4, wm), b1 = paste::upsample_tap(cx.i1, 4, wm);
    const float w0 = 1.f - cx.l1, h0 = 1.f - ry.l1;
    const float top = w0 * paste::upsampled(map, wm, a0, b0) + cx.l1 * paste::upsampled(map, wm, a0, b1);
    const float bottom = w0 * paste::upsampled(map, wm, a1, b0) + cx.l1 * paste::upsampled(map, wm, a1, b1);
    value = h0 * top + ry.l1 * bottom;
  }
  out[k] = value > threshold;
}

at::Tensor paste_masks_cuda(const at::Tensor& probs, const at::Tensor& boxes, int64_t image_h, int64_t image_w,
                            int64_t out_h, int64_t out_w, double threshold) {
  check_paste_masks_inputs(probs, boxes, image_h, image_w, out_h, out_w, threshold);
  const c10::cuda::CUDAGuard guard(probs.device());
  const int64_t n = probs.size(0);
  auto output = at::empty({n, out_h, out_w}, probs.options().dtype(at::kBool));
  const int64_t total = output.numel();
  if (total == 0) return output;
  const auto p = probs.contiguous();
  const auto b = boxes.to(at::kDouble).contiguous();
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  paste_masks_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      p.data_ptr<float>(), b.data_ptr<double>(), n, probs.size(1), probs.size(2), image_h, image_w, out_h, out_w,
      static_cast<float>(threshold), output.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiffinst, CUDA, m) { m.impl("paste_masks", TORCH_FN(paste_masks_cuda)); }

}  // namespace fastdiffinst
