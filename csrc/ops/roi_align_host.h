// Host-side code shared by the CPU and CUDA RoIAlign kernels: argument checks, the level-rule
// set-up and the registered entry points. The Python layer checks the same things first with
// friendlier messages; these keep the native ops memory-safe when called through torch.ops.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "ops/common/roi_align_math.h"

namespace fastdiffinst {

constexpr int64_t kDefaultCanonicalBoxSize = 224;
constexpr int64_t kDefaultCanonicalLevel = 4;

struct LevelRule {
  int canonical_box_size;
  int canonical_level;
  int min_level;  // -log2(spatial_scales[0])
};

// The arguments of a RoIAlign call that its forward and backward share (single-level roi_align is
// the one-level case, with detectron2's default level rule).
struct RoIAlignArgs {
  at::ArrayRef<double> spatial_scales;  // one per level
  int64_t sampling_ratio;
  bool aligned;
  int64_t canonical_box_size;
  int64_t canonical_level;
  const char* op;  // the name errors give
};

inline LevelRule make_level_rule(const RoIAlignArgs& args) {
  const at::ArrayRef<double> scales = args.spatial_scales;
  const int64_t canonical_box_size = args.canonical_box_size, canonical_level = args.canonical_level;
  TORCH_CHECK(canonical_box_size > 0 && canonical_box_size <= (int64_t(1) << 30),
              "canonical_box_size must be in [1, 2^30], got ", canonical_box_size);
  TORCH_CHECK(canonical_level >= -64 && canonical_level <= 64, "canonical_level must be in [-64, 64], got ",
              canonical_level);
  const double min_level = -std::log2(scales[0]);
  const double rounded = std::round(min_level);
  for (size_t l = 0; l < scales.size(); ++l) {
    TORCH_CHECK(scales.size() == 1 || std::abs(-std::log2(scales[l]) - (rounded + double(l))) < 1e-6,
                "spatial_scales must be consecutive powers of two (1/2^k, 1/2^(k+1), ...), got spatial_scales[", l,
                "] = ", scales[l]);
  }
  return {static_cast<int>(canonical_box_size), static_cast<int>(canonical_level), static_cast<int>(rounded)};
}

// Box coordinates are read in fp32, or fp64 for fp64 features, whatever the dtype of `rois`.
inline at::Tensor coord_rois(const at::Tensor& rois, at::ScalarType feature_dtype) {
  return rois.to(feature_dtype == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

// The integer arguments the kernels narrow to int.
inline void check_sampling(int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, const char* op) {
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0 && pooled_h <= kMaxInt && pooled_w <= kMaxInt, op,
              ": output_size must be positive (and fit in int32), got (", pooled_h, ", ", pooled_w, ")");
  TORCH_CHECK(sampling_ratio <= roi::kMaxAdaptiveGrid && sampling_ratio >= std::numeric_limits<int>::min(), op,
              ": sampling_ratio must be at most ", roi::kMaxAdaptiveGrid, " (<= 0 for the adaptive grid), got ",
              sampling_ratio);
}

inline void check_roi_align_inputs(at::TensorList features, const at::Tensor& rois, at::ArrayRef<double> scales,
                                   int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, const char* op) {
  check_sampling(pooled_h, pooled_w, sampling_ratio, op);
  TORCH_CHECK(!features.empty(), op, ": features must hold at least one tensor");
  TORCH_CHECK(features.size() <= static_cast<size_t>(roi::kMaxLevels), op, ": at most ", roi::kMaxLevels,
              " feature levels are supported, got ", features.size());
  TORCH_CHECK(scales.size() == features.size(), op, ": len(spatial_scales) must equal len(features) (", features.size(),
              "), got ", scales.size());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must be [K, 5], got ", rois.sizes());
  TORCH_CHECK(at::isFloatingType(rois.scalar_type()), op, ": rois must be floating point, got ", rois.scalar_type());
  const auto& first = features[0];
  for (size_t l = 0; l < features.size(); ++l) {
    const auto& f = features[l];
    TORCH_CHECK(f.dim() == 4, op, ": features[", l, "] must be [B, C, H, W], got ", f.sizes());
    TORCH_CHECK(f.device() == rois.device(), op, ": features[", l, "] is on ", f.device(), " but rois on ",
                rois.device());
    TORCH_CHECK(f.scalar_type() == first.scalar_type(), op, ": features[", l, "] has dtype ", f.scalar_type(),
                ", features[0] has ", first.scalar_type());
    TORCH_CHECK(f.size(0) == first.size(0) && f.size(1) == first.size(1), op, ": features[", l, "] has batch/channels ",
                f.size(0), "/", f.size(1), ", features[0] has ", first.size(0), "/", first.size(1));
    TORCH_CHECK(scales[l] > 0 && std::isfinite(scales[l]), op, ": spatial_scales[", l, "] must be positive, got ",
                scales[l]);
  }
}

inline void check_roi_align_backward_inputs(const at::Tensor& grad, const at::Tensor& rois, at::ArrayRef<double> scales,
                                            at::IntArrayRef heights, at::IntArrayRef widths, int64_t batch_size,
                                            int64_t channels, int64_t sampling_ratio, const char* op) {
  TORCH_CHECK(grad.dim() == 4, op, ": grad must be [K, C, PH, PW], got ", grad.sizes());
  check_sampling(grad.size(2), grad.size(3), sampling_ratio, op);
  TORCH_CHECK(!heights.empty() && heights.size() <= static_cast<size_t>(roi::kMaxLevels), op, ": between 1 and ",
              roi::kMaxLevels, " levels are supported, got ", heights.size());
  TORCH_CHECK(heights.size() == widths.size() && heights.size() == scales.size(), op,
              ": heights, widths and spatial_scales must have one entry per level");
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels, op,
              ": grad must be [K, C, PH, PW] with K = ", rois.size(0), " and C = ", channels, ", got ", grad.sizes());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must be [K, 5], got ", rois.sizes());
  TORCH_CHECK(grad.device() == rois.device(), op, ": grad is on ", grad.device(), " but rois on ", rois.device());
  TORCH_CHECK(batch_size >= 0 && channels >= 0, op, ": batch_size and channels must be non-negative");
}

// The four registered ops of the RoIAlign family on one device, built from that device's multi-level
// forward and backward, which get checked arguments:
//   at::Tensor Forward(features, rois, pooled_h, pooled_w, const RoIAlignArgs&)
//   std::vector<at::Tensor> Backward(grad, rois, heights, widths, batch_size, channels, const RoIAlignArgs&)
template <auto Forward, auto Backward>
struct RoIAlignEntryPoints {
  static at::Tensor forward(at::TensorList features, const at::Tensor& rois, int64_t pooled_h, int64_t pooled_w,
                            const RoIAlignArgs& args) {
    check_roi_align_inputs(features, rois, args.spatial_scales, pooled_h, pooled_w, args.sampling_ratio, args.op);
    return Forward(features, rois, pooled_h, pooled_w, args);
  }

  // The schema arguments of the four ops, named. `spatial_scales` must outlive the call: the
  // single-level ops pass their own `spatial_scale` parameter as a one-level list.
  static RoIAlignArgs make_args(at::ArrayRef<double> spatial_scales, int64_t sampling_ratio, bool aligned,
                                int64_t canonical_box_size, int64_t canonical_level, const char* op) {
    return {.spatial_scales = spatial_scales,
            .sampling_ratio = sampling_ratio,
            .aligned = aligned,
            .canonical_box_size = canonical_box_size,
            .canonical_level = canonical_level,
            .op = op};
  }

  static std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& rois, at::IntArrayRef heights,
                                          at::IntArrayRef widths, int64_t batch_size, int64_t channels,
                                          const RoIAlignArgs& args) {
    check_roi_align_backward_inputs(grad, rois, args.spatial_scales, heights, widths, batch_size, channels,
                                    args.sampling_ratio, args.op);
    return Backward(grad, rois, heights, widths, batch_size, channels, args);
  }

  static at::Tensor roi_align(const at::Tensor& input, const at::Tensor& rois, double spatial_scale, int64_t pooled_h,
                              int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
    return forward({input}, rois, pooled_h, pooled_w,
                   make_args(at::ArrayRef<double>(spatial_scale), sampling_ratio, aligned, kDefaultCanonicalBoxSize,
                             kDefaultCanonicalLevel, "roi_align"));
  }

  static at::Tensor roi_align_backward(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                       int64_t pooled_h, int64_t pooled_w, int64_t batch_size, int64_t channels,
                                       int64_t height, int64_t width, int64_t sampling_ratio, bool aligned) {
    TORCH_CHECK(grad.dim() == 4 && grad.size(2) == pooled_h && grad.size(3) == pooled_w,
                "roi_align backward: grad must be [K, C, ", pooled_h, ", ", pooled_w, "], got ", grad.sizes());
    return backward(grad, rois, at::IntArrayRef(height), at::IntArrayRef(width), batch_size, channels,
                    make_args(at::ArrayRef<double>(spatial_scale), sampling_ratio, aligned, kDefaultCanonicalBoxSize,
                              kDefaultCanonicalLevel, "roi_align backward"))[0];
  }

  static at::Tensor multilevel(at::TensorList features, const at::Tensor& rois, at::ArrayRef<double> scales,
                               int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                               int64_t canonical_box_size, int64_t canonical_level) {
    return forward(features, rois, pooled_h, pooled_w,
                   make_args(scales, sampling_ratio, aligned, canonical_box_size, canonical_level,
                             "multilevel_roi_align"));
  }

  static std::vector<at::Tensor> multilevel_backward(const at::Tensor& grad, const at::Tensor& rois,
                                                     at::ArrayRef<double> scales, at::IntArrayRef heights,
                                                     at::IntArrayRef widths, int64_t batch_size, int64_t channels,
                                                     int64_t sampling_ratio, bool aligned, int64_t canonical_box_size,
                                                     int64_t canonical_level) {
    return backward(grad, rois, heights, widths, batch_size, channels,
                    make_args(scales, sampling_ratio, aligned, canonical_box_size, canonical_level,
                              "multilevel_roi_align backward"));
  }

  static void register_kernels(torch::Library& m) {
    m.impl("roi_align", TORCH_FN(roi_align));
    m.impl("_roi_align_backward", TORCH_FN(roi_align_backward));
    m.impl("multilevel_roi_align", TORCH_FN(multilevel));
    m.impl("_multilevel_roi_align_backward", TORCH_FN(multilevel_backward));
  }
};

}  // namespace fastdiffinst
