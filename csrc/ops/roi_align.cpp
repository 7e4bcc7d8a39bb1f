// CPU kernels of roi_align and multilevel_roi_align (forward and backward).
//
// Layout: the features are read channels-last (NHWC), so every bilinear tap is one contiguous
// vector of C values and the inner loop is a vectorised axpy over channels. An NCHW input is
// transposed once per call into a reused workspace (free when it already is channels_last).
//
// Sampling plan: bilinear weights are separable, so per RoI we build, for every output row and
// column, the list of (index, weight) taps of all its samples along that axis, with taps that hit
// the same pixel merged. A bin's value is sum_{y taps} sum_{x taps} w_y * w_x * f(y, x) / count,
// the same sum torchvision evaluates sample by sample, with 4-16x fewer channel vectors read when
// samples are closer than a pixel (the common case at the assigned FPN level).
//
// Forward: parallel over RoIs. Backward: parallel over channel blocks, every thread walking all
// RoIs in order, so the gradient is race-free and deterministic whatever the thread count; it
// accumulates channels-last in a reused workspace and returns contiguous (NCHW) gradients.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/common/cpu_clones.h"
#include "ops/common/cpu_layout.h"
#include "ops/common/opmath.h"
#include "ops/common/roi_align_math.h"
#include "ops/roi_align_host.h"

namespace fastdiffinst {
namespace {

template <typename coord_t>
struct Tap {
  int64_t index;
  coord_t weight;
};

// Merged bilinear taps of every bin of one RoI along one axis.
template <typename coord_t>
struct AxisPlan {
  std::vector<int64_t> begin;  // taps of bin p are taps[begin[p] .. begin[p + 1])
  std::vector<Tap<coord_t>> taps;

  void build(coord_t start, coord_t bin_size, int pooled, int grid, int64_t size) {
    begin.clear();
    taps.clear();
    for (int p = 0; p < pooled; ++p) {
      const int64_t first = static_cast<int64_t>(taps.size());
      begin.push_back(first);
      const auto range = roi::sample_range(start, bin_size, p, grid, size);
      for (int i = range.first; i < range.last; ++i) {
        const auto t = roi::axis_taps(roi::sample_coord(start, bin_size, p, i, grid), size);
        if (!t.valid) continue;
        add(first, t.lo, t.w_lo);
        add(first, t.hi, t.w_hi);
      }
    }
    begin.push_back(static_cast<int64_t>(taps.size()));
  }

 private:
  // Sample positions increase along the axis, so a repeated index is always one of the last
  // two taps of the bin.
  void add(int64_t first, int64_t index, coord_t weight) {
    const int64_t n = static_cast<int64_t>(taps.size());
    for (int64_t j = std::max(first, n - 2); j < n; ++j) {
      if (taps[j].index == index) {
        taps[j].weight += weight;
        return;
      }
    }
    taps.push_back({index, weight});
  }
};

// One pyramid level as the kernels see it: channels-last storage.
template <typename T>
struct Level {
  T* data;  // [B, H, W, C]
  int64_t height, width;
  double scale;
};

template <typename acc_t, typename scalar_t>
inline void axpy(acc_t* __restrict dst, const scalar_t* __restrict src, acc_t w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += w * static_cast<acc_t>(src[i]);
}

// The fp32 loop is the hot one: compiled for AVX2+FMA as well as the baseline, picked at load time.
FASTDIFFINST_CPU_CLONES
void axpy(float* __restrict dst, const float* __restrict src, float w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += w * src[i];
}

template <typename coord_t>
struct RoIPlan {
  AxisPlan<coord_t> rows, cols;
  coord_t count;
  int64_t batch;
  int level;
};

// Plans RoI k: its level, image and merged taps. `rois` is [K, 5] of coord_t. A RoI that matches no
// level (level -1, see roi::assign_level) gets no taps: a zero output row and no gradient.
template <typename coord_t, typename T>
void plan_roi(RoIPlan<coord_t>& plan, const coord_t* roi, const std::vector<Level<T>>& levels, const LevelRule& rule,
              int pooled_h, int pooled_w, int sampling_ratio, bool aligned) {
  plan.batch = static_cast<int64_t>(roi[0]);
  plan.level = levels.size() == 1
                   ? 0
                   : roi::assign_level(static_cast<float>(roi[1]), static_cast<float>(roi[2]),
                                       static_cast<float>(roi[3]), static_cast<float>(roi[4]), rule.canonical_box_size,
                                       rule.canonical_level, rule.min_level, static_cast<int>(levels.size()));
  const auto& lv = levels[plan.level < 0 ? 0 : plan.level];
  const auto g = roi::roi_geometry<coord_t>(roi[1], roi[2], roi[3], roi[4], static_cast<coord_t>(lv.scale), pooled_h,
                                            pooled_w, sampling_ratio, aligned);
  const int grid_h = plan.level < 0 ? 0 : g.grid_h;
  plan.rows.build(g.start_y, g.bin_h, pooled_h, grid_h, lv.height);
  plan.cols.build(g.start_x, g.bin_w, pooled_w, g.grid_w, lv.width);
  plan.count = g.count;
  if (plan.level < 0) plan.level = 0;
}

template <typename scalar_t>
void forward_kernel(const std::vector<Level<const scalar_t>>& levels, const at::Tensor& rois, at::Tensor& output,
                    const LevelRule& rule, int pooled_h, int pooled_w, int sampling_ratio, bool aligned) {
  using acc_t = opmath_t<scalar_t>;
  using coord_t = opmath_t<scalar_t>;
  const int64_t num_rois = rois.size(0);
  const int64_t channels = output.size(1);
  const int64_t bins = int64_t(pooled_h) * pooled_w;
  const coord_t* roi_data = rois.data_ptr<coord_t>();
  scalar_t* out = output.data_ptr<scalar_t>();

  at::parallel_for(0, num_rois, 1, [&](int64_t begin, int64_t end) {
    RoIPlan<coord_t> plan;
    std::vector<acc_t> acc(channels);
    for (int64_t k = begin; k < end; ++k) {
      plan_roi(plan, roi_data + 5 * k, levels, rule, pooled_h, pooled_w, sampling_ratio, aligned);
      const auto& lv = levels[plan.level];
      const scalar_t* image = lv.data + plan.batch * lv.height * lv.width * channels;
      scalar_t* out_roi = out + k * channels * bins;
      for (int ph = 0; ph < pooled_h; ++ph) {
        for (int pw = 0; pw < pooled_w; ++pw) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t ty = plan.rows.begin[ph]; ty < plan.rows.begin[ph + 1]; ++ty) {
            const auto& row = plan.rows.taps[ty];
            const scalar_t* line = image + row.index * lv.width * channels;
            for (int64_t tx = plan.cols.begin[pw]; tx < plan.cols.begin[pw + 1]; ++tx) {
              const auto& col = plan.cols.taps[tx];
              axpy(acc.data(), line + col.index * channels, static_cast<acc_t>(row.weight * col.weight), channels);
            }
          }
          const acc_t inv_count = acc_t(1) / static_cast<acc_t>(plan.count);
          scalar_t* out_bin = out_roi + ph * pooled_w + pw;
          for (int64_t c = 0; c < channels; ++c) out_bin[c * bins] = static_cast<scalar_t>(acc[c] * inv_count);
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const std::vector<Level<acc_t>>& grad_levels, const at::Tensor& rois, const at::Tensor& grad,
                     const LevelRule& rule, int pooled_h, int pooled_w, int sampling_ratio, bool aligned) {
  using coord_t = opmath_t<scalar_t>;
  const int64_t num_rois = rois.size(0);
  const int64_t channels = grad.size(1);
  const int64_t bins = int64_t(pooled_h) * pooled_w;
  const coord_t* roi_data = rois.data_ptr<coord_t>();
  const scalar_t* grad_data = grad.data_ptr<scalar_t>();
  // Channel blocks of 16 (vector boundaries), split among the threads.
  constexpr int64_t kBlock = 16;
  const int64_t blocks = (channels + kBlock - 1) / kBlock;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());

  at::parallel_for(0, blocks, (blocks + threads - 1) / threads, [&](int64_t block_begin, int64_t block_end) {
    const int64_t c_begin = block_begin * kBlock, c_end = std::min(channels, block_end * kBlock);
    const int64_t width = c_end - c_begin;
    RoIPlan<coord_t> plan;
    std::vector<acc_t> grad_bins(bins * width);  // [bin][channel] of this block, divided by count
    for (int64_t k = 0; k < num_rois; ++k) {
      plan_roi(plan, roi_data + 5 * k, grad_levels, rule, pooled_h, pooled_w, sampling_ratio, aligned);
      const acc_t inv_count = acc_t(1) / static_cast<acc_t>(plan.count);
      const scalar_t* g = grad_data + (k * channels + c_begin) * bins;
      for (int64_t c = 0; c < width; ++c)
        for (int64_t b = 0; b < bins; ++b) grad_bins[b * width + c] = static_cast<acc_t>(g[c * bins + b]) * inv_count;
      const auto& lv = grad_levels[plan.level];
      acc_t* image = lv.data + plan.batch * lv.height * lv.width * channels + c_begin;
      for (int ph = 0; ph < pooled_h; ++ph) {
        for (int pw = 0; pw < pooled_w; ++pw) {
          const acc_t* gb = grad_bins.data() + (ph * pooled_w + pw) * width;
          for (int64_t ty = plan.rows.begin[ph]; ty < plan.rows.begin[ph + 1]; ++ty) {
            const auto& row = plan.rows.taps[ty];
            acc_t* line = image + row.index * lv.width * channels;
            for (int64_t tx = plan.cols.begin[pw]; tx < plan.cols.begin[pw + 1]; ++tx) {
              const auto& col = plan.cols.taps[tx];
              axpy(line + col.index * channels, gb, static_cast<acc_t>(row.weight * col.weight), width);
            }
          }
        }
      }
    }
  });
}

// Value checks the Python layer cannot do without reading data: finite boxes, batch index in range.
void check_roi_values(const at::Tensor& rois, int64_t batch_size, const char* op) {
  AT_DISPATCH_FLOATING_TYPES(rois.scalar_type(), "check_roi_values", [&] {
    const scalar_t* r = rois.data_ptr<scalar_t>();
    for (int64_t k = 0; k < rois.size(0); ++k) {
      const scalar_t* roi = r + 5 * k;
      for (int j = 0; j < 5; ++j) {
        TORCH_CHECK(std::isfinite(static_cast<double>(roi[j])), op, ": rois must be finite, but rois[", k, "] = (",
                    roi[0], ", ", roi[1], ", ", roi[2], ", ", roi[3], ", ", roi[4], ")");
      }
      // Truncated toward zero like torchvision, so (-1, B) is the valid range.
      TORCH_CHECK(roi[0] > scalar_t(-1) && roi[0] < static_cast<scalar_t>(batch_size), op, ": rois[", k,
                  ", 0] is the batch index and must be in [0, ", batch_size, "), got ", roi[0]);
    }
  });
}

template <typename T>
std::vector<Level<T>> level_views(at::TensorList tensors, at::ArrayRef<double> scales) {
  std::vector<Level<T>> levels;
  for (size_t l = 0; l < tensors.size(); ++l)
    levels.push_back({tensors[l].data_ptr<std::remove_const_t<T>>(), tensors[l].size(2), tensors[l].size(3),
                      scales[l]});
  return levels;
}

// The checked multi-level forward and backward (see RoIAlignEntryPoints).
at::Tensor multilevel_forward_cpu(at::TensorList features, const at::Tensor& rois, int64_t pooled_h, int64_t pooled_w,
                                  const RoIAlignArgs& args) {
  const auto& first = features[0];
  auto output = at::empty({rois.size(0), first.size(1), pooled_h, pooled_w}, first.options());
  if (output.numel() == 0) return output;
  std::vector<at::Tensor> nhwc;
  for (size_t l = 0; l < features.size(); ++l) nhwc.push_back(channels_last_view(features[l], l));
  const auto r = coord_rois(rois, first.scalar_type());
  check_roi_values(r, first.size(0), args.op);
  const LevelRule rule = make_level_rule(args);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "roi_align_forward", [&] {
    forward_kernel<scalar_t>(level_views<const scalar_t>(nhwc, args.spatial_scales), r, output, rule, pooled_h,
                             pooled_w, args.sampling_ratio, args.aligned);
  });
  return output;
}

std::vector<at::Tensor> multilevel_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, at::IntArrayRef heights,
                                                at::IntArrayRef widths, int64_t batch_size, int64_t channels,
                                                const RoIAlignArgs& args) {
  const auto acc_dtype = at::toOpMathType(grad.scalar_type());
  // Accumulate channels-last in reused workspaces, then hand back contiguous (NCHW) gradients.
  std::vector<at::Tensor> sums;
  for (size_t l = 0; l < heights.size(); ++l) {
    sums.push_back(channels_last_workspace(l, {batch_size, channels, heights[l], widths[l]},
                                           grad.options().dtype(acc_dtype)));
    sums.back().zero_();
  }
  if (grad.numel() > 0) {
    const auto g = grad.contiguous();
    const auto r = coord_rois(rois, grad.scalar_type());
    check_roi_values(r, batch_size, args.op);
    const LevelRule rule = make_level_rule(args);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward", [&] {
      using acc_t = opmath_t<scalar_t>;
      backward_kernel<scalar_t, acc_t>(level_views<acc_t>(sums, args.spatial_scales), r, g, rule, grad.size(2),
                                       grad.size(3), args.sampling_ratio, args.aligned);
    });
  }
  std::vector<at::Tensor> grads;
  for (const auto& sum : sums) grads.push_back(channels_last_to_contiguous(sum, grad.scalar_type()));
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiffinst, CPU, m) {
  RoIAlignEntryPoints<multilevel_forward_cpu, multilevel_backward_cpu>::register_kernels(m);
}

}  // namespace fastdiffinst
