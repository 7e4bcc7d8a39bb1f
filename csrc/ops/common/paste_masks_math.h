// Mask-pasting arithmetic shared by the CPU (ops/paste_masks.cpp) and CUDA (ops/cuda/paste_masks.cu)
// kernels: DiffusionInst's detector_postprocess for one output pixel, without its full-resolution
// temporaries. The official chain, for probabilities at mask stride f (4 in DiffusionInst), is
//   full = aligned_bilinear(P, f)[:h, :w]        P: [Hm, Wm] stride-f probabilities
//   out  = bilinear(full, (H, W), align_corners=False) > threshold, zero outside the box,
// and aligned_bilinear(P, f)[i] = up[max(i - f/2, 0)] with up = bilinear(P padded right/bottom by one
// replicated pixel, (f·Hm + 1, f·Wm + 1), align_corners=True). Each bilinear step is evaluated
// here as torch's kernel evaluates it (fp32 weights from the same formulas, rows of columns), so
// the two agree to rounding: a pixel can differ only where the probability is within a few ulp
// of the threshold.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace fastdiffinst {
namespace paste {

// One output index along an axis: the two source indices and the weight of the second.
struct Tap {
  int64_t i0, i1;
  float l1;
};

// align_corners=True step of aligned_bilinear along an axis of `in_size` stride-`factor` pixels:
// full index i -> indices into P (the padded pixel in_size is the replicate of in_size - 1).
C10_HOST_DEVICE inline Tap upsample_tap(int64_t i, int64_t factor, int64_t in_size) {
  int64_t k = i - factor / 2;
  if (k < 0) k = 0;
  // torch: scale = (in - 1) / (out - 1) over the padded sizes, in fp32: in_size / (factor·in_size).
  const float scale = static_cast<float>(in_size) / static_cast<float>(factor * in_size);
  const float src = scale * static_cast<float>(k);
  const int64_t i0 = static_cast<int64_t>(src);
  float l1 = src - static_cast<float>(i0);
  if (l1 > 1.f) l1 = 1.f;
  const int64_t i1 = i0 + (i0 < in_size ? 1 : 0);
  return {i0 < in_size ? i0 : in_size - 1, i1 < in_size ? i1 : in_size - 1, l1};
}

// align_corners=False resize along an axis from `in_size` to `out_size` pixels: output index o ->
// indices into the cropped full-resolution map.
C10_HOST_DEVICE inline Tap resize_tap(int64_t o, int64_t in_size, int64_t out_size) {
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  float src = scale * (static_cast<float>(o) + 0.5f) - 0.5f;
  if (src < 0.f) src = 0.f;
  const int64_t i0 = static_cast<int64_t>(src);
  float l1 = src - static_cast<float>(i0);
  if (l1 > 1.f) l1 = 1.f;
  return {i0, i0 + (i0 < in_size - 1 ? 1 : 0), l1};
}

// The aligned-upsampled probability at full-resolution (row tap r, column tap c) of P (row-major,
// `width` columns).
C10_HOST_DEVICE inline float upsampled(const float* P, int64_t width, Tap r, Tap c) {
  const float r0 = 1.f - r.l1, c0 = 1.f - c.l1;
  const float* top = P + r.i0 * width;
  const float* bottom = P + r.i1 * width;
  return r0 * (c0 * top[c.i0] + c.l1 * top[c.i1]) + r.l1 * (c0 * bottom[c.i0] + c.l1 * bottom[c.i1]);
}

// The resized probability of one output pixel (align_corners=False bilinear of the aligned-upsampled
// map): row tap ry and column tap cx of the resize (resize_tap), and the upsampling taps (upsample_tap)
// of its two source rows, a0 = rows ry.i0 and a1 = ry.i1, and columns, b0 = cx.i0 and b1 = cx.i1.
C10_HOST_DEVICE inline float resized(const float* P, int64_t width, Tap ry, Tap a0, Tap a1, Tap cx, Tap b0, Tap b1) {
  const float w0 = 1.f - cx.l1, h0 = 1.f - ry.l1;
  const float top = w0 * upsampled(P, width, a0, b0) + cx.l1 * upsampled(P, width, a0, b1);
  const float bottom = w0 * upsampled(P, width, a1, b0) + cx.l1 * upsampled(P, width, a1, b1);
  return h0 * top + ry.l1 * bottom;
}

// Truncated box corners clamped to [0, size]: the rows/columns [lo, hi) that clip_mask keeps.
// The corners come in float64 so that no box dtype is rounded before its truncation.
C10_HOST_DEVICE inline void box_span(double a, double b, int64_t size, int64_t* lo, int64_t* hi) {
  // Truncation toward zero (torch's .to(int64)); clamping first keeps the cast defined, and a NaN
  // corner becomes 0 (the CPU kernel rejects non-finite boxes before this).
  const double dsize = static_cast<double>(size);
  a = a >= 0.0 ? (a <= dsize ? a : dsize) : 0.0;
  b = b >= 0.0 ? (b <= dsize ? b : dsize) : 0.0;
  *lo = static_cast<int64_t>(a);
  *hi = static_cast<int64_t>(b);
}

}  // namespace paste
}  // namespace fastdiffinst
