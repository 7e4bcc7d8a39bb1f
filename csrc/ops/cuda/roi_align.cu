// CUDA kernels of roi_align and multilevel_roi_align (forward and backward).
//
// Forward: one thread per output element (k, c, ph, pw) over NCHW features; the RoI's pyramid
// level is computed in-kernel, so all levels are served by one launch with no host sync.
// Backward: one thread per grad element, scattering into contiguous per-level gradients (the
// layout the CPU kernel returns too). By default with fp32/fp64 atomics; under
// torch.use_deterministic_algorithms(True) with int64 fixed-point atomics, whose sums do not
// depend on the order of the additions, converted back afterwards.
//
// Bad values never read out of bounds: a batch index outside [0, B) or a NaN box gives zeros
// (fastdiffinst.ops.set_input_checks(True) raises for them instead, at the cost of a sync).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/common/opmath.h"
#include "ops/common/roi_align_math.h"
#include "ops/roi_align_host.h"

namespace fastdiffinst {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct LevelTable {
  T* data[roi::kMaxLevels];
  int64_t height[roi::kMaxLevels];
  int64_t width[roi::kMaxLevels];
  double scale[roi::kMaxLevels];
  int num_levels;
  int canonical_box_size, canonical_level, min_level;
};

template <typename T>
LevelTable<T> make_table(const std::vector<at::Tensor>& tensors, at::ArrayRef<double> scales, const LevelRule& rule) {
  LevelTable<T> t{};
  t.num_levels = static_cast<int>(tensors.size());
  for (int l = 0; l < t.num_levels; ++l) {
    t.data[l] = reinterpret_cast<T*>(tensors[l].data_ptr());
    t.height[l] = tensors[l].size(2);
    t.width[l] = tensors[l].size(3);
    t.scale[l] = scales[l];
  }
  t.canonical_box_size = rule.canonical_box_size;
  t.canonical_level = rule.canonical_level;
  t.min_level = rule.min_level;
  return t;
}

// Output element idx = (k, c, ph, pw) of the [K, C, PH, PW] result: its RoI's image, level and bins.
template <typename coord_t>
struct BinLocation {
  int64_t batch;  // -1 when the element is skipped: batch index outside [0, B) or NaN, or no level
  int64_t channel;
  int ph, pw, level;
  roi::RoIGeometry<coord_t> geometry;
};

template <typename T, typename coord_t>
__device__ inline BinLocation<coord_t> locate_bin(const LevelTable<T>& levels, const coord_t* rois, int64_t idx,
                                                  int64_t batch, int64_t channels, int pooled_h, int pooled_w,
                                                  int sampling_ratio, bool aligned) {
  BinLocation<coord_t> loc;
  loc.pw = static_cast<int>(idx % pooled_w);
  loc.ph = static_cast<int>((idx / pooled_w) % pooled_h);
  loc.channel = (idx / (int64_t(pooled_w) * pooled_h)) % channels;
  const coord_t* roi = rois + 5 * (idx / (int64_t(pooled_w) * pooled_h * channels));
  // Truncated toward zero like torchvision, so (-1, B) is the valid range; NaN is not.
  loc.batch = roi[0] > coord_t(-1) && roi[0] < static_cast<coord_t>(batch) ? static_cast<int64_t>(roi[0]) : -1;
  loc.level = levels.num_levels == 1 ? 0
                                     : roi::assign_level(float(roi[1]), float(roi[2]), float(roi[3]), float(roi[4]),
                                                         levels.canonical_box_size, levels.canonical_level,
                                                         levels.min_level, levels.num_levels);
  if (loc.level < 0) {  // matches no level (detectron2): a zero row, no gradient
    loc.batch = -1;
    loc.level = 0;
  }
  loc.geometry = roi::roi_geometry<coord_t>(roi[1], roi[2], roi[3], roi[4], coord_t(levels.scale[loc.level]), pooled_h,
                                            pooled_w, sampling_ratio, aligned);
  return loc;
}

// Calls visit(ty, tx) (roi::AxisTaps along y and x) for every non-empty sample of bin (ph, pw) of a
// RoI with geometry g on a height × width map, skipping the samples that cannot fall inside it.
template <typename coord_t, typename Visit>
__device__ inline void for_each_sample(const roi::RoIGeometry<coord_t>& g, int ph, int pw, int64_t height,
                                       int64_t width, const Visit& visit) {
  const auto rows = roi::sample_range(g.start_y, g.bin_h, ph, g.grid_h, height);
  const auto cols = roi::sample_range(g.start_x, g.bin_w, pw, g.grid_w, width);
  for (int iy = rows.first; iy < rows.last; ++iy) {
    const auto ty = roi::axis_taps(roi::sample_coord(g.start_y, g.bin_h, ph, iy, g.grid_h), height);
    if (!ty.valid) continue;
    for (int ix = cols.first; ix < cols.last; ++ix) {
      const auto tx = roi::axis_taps(roi::sample_coord(g.start_x, g.bin_w, pw, ix, g.grid_w), width);
      if (!tx.valid) continue;
      visit(ty, tx);
    }
  }
}

inline unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20));
}

template <typename scalar_t, typename coord_t>
__global__ void forward_kernel(LevelTable<const scalar_t> levels, const coord_t* __restrict__ rois, int64_t num_rois,
                               int64_t batch, int64_t channels, int pooled_h, int pooled_w, int sampling_ratio,
                               bool aligned, scalar_t* __restrict__ out) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t total = num_rois * channels * pooled_h * pooled_w;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const auto bin = locate_bin(levels, rois, idx, batch, channels, pooled_h, pooled_w, sampling_ratio, aligned);
    if (bin.batch < 0) {
      out[idx] = scalar_t(0);
      continue;
    }
    const int ph = bin.ph, pw = bin.pw, l = bin.level;
    const int64_t height = levels.height[l], width = levels.width[l], c = bin.channel, b = bin.batch;
    const auto& g = bin.geometry;
    const scalar_t* plane = levels.data[l] + (b * channels + c) * height * width;
    acc_t sum = 0;
    for_each_sample(g, ph, pw, height, width, [&](const auto& ty, const auto& tx) {
      sum += acc_t(ty.w_lo * tx.w_lo) * acc_t(plane[ty.lo * width + tx.lo]) +
             acc_t(ty.w_lo * tx.w_hi) * acc_t(plane[ty.lo * width + tx.hi]) +
             acc_t(ty.w_hi * tx.w_lo) * acc_t(plane[ty.hi * width + tx.lo]) +
             acc_t(ty.w_hi * tx.w_hi) * acc_t(plane[ty.hi * width + tx.hi]);
    });
    out[idx] = static_cast<scalar_t>(sum / acc_t(g.count));
  }
}

// Adds `value` to a gradient element: a float/double atomic, or an int64 fixed-point
// atomic (value * scale, rounded) whose total is independent of the order of additions.
template <typename acc_t, bool kFixedPoint>
struct GradSink;

template <typename acc_t>
struct GradSink<acc_t, false> {
  using storage_t = acc_t;
  __device__ static void add(storage_t* p, acc_t v, const double*) { atomicAdd(p, v); }
};

template <typename acc_t>
struct GradSink<acc_t, true> {
  using storage_t = unsigned long long;
  __device__ static void add(storage_t* p, acc_t v, const double* scale) {
    const long long q = llrint(static_cast<double>(v) * *scale);
    atomicAdd(p, static_cast<unsigned long long>(q));
  }
};

template <typename scalar_t, typename coord_t, typename Sink>
__global__ void backward_kernel(const scalar_t* __restrict__ grad, LevelTable<typename Sink::storage_t> levels,
                                const coord_t* __restrict__ rois, int64_t num_rois, int64_t batch, int64_t channels,
                                int pooled_h, int pooled_w, int sampling_ratio, bool aligned,
                                const double* __restrict__ fixed_point_scale) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t total = num_rois * channels * pooled_h * pooled_w;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const auto bin = locate_bin(levels, rois, idx, batch, channels, pooled_h, pooled_w, sampling_ratio, aligned);
    if (bin.batch < 0) continue;
    const int ph = bin.ph, pw = bin.pw, l = bin.level;
    const int64_t height = levels.height[l], width = levels.width[l], c = bin.channel, b = bin.batch;
    const auto& g = bin.geometry;
    const acc_t g_bin = acc_t(grad[idx]) / acc_t(g.count);
    typename Sink::storage_t* plane = levels.data[l] + (b * channels + c) * height * width;
    for_each_sample(g, ph, pw, height, width, [&](const auto& ty, const auto& tx) {
      Sink::add(plane + ty.lo * width + tx.lo, acc_t(ty.w_lo * tx.w_lo) * g_bin, fixed_point_scale);
      Sink::add(plane + ty.lo * width + tx.hi, acc_t(ty.w_lo * tx.w_hi) * g_bin, fixed_point_scale);
      Sink::add(plane + ty.hi * width + tx.lo, acc_t(ty.w_hi * tx.w_lo) * g_bin, fixed_point_scale);
      Sink::add(plane + ty.hi * width + tx.hi, acc_t(ty.w_hi * tx.w_hi) * g_bin, fixed_point_scale);
    });
  }
}

// The checked multi-level forward and backward (see RoIAlignEntryPoints).
at::Tensor multilevel_forward_cuda(at::TensorList features, const at::Tensor& rois, int64_t pooled_h, int64_t pooled_w,
                                   const RoIAlignArgs& args) {
  const auto& first = features[0];
  c10::cuda::CUDAGuard guard(first.device());
  auto output = at::empty({rois.size(0), first.size(1), pooled_h, pooled_w}, first.options());
  if (output.numel() == 0) return output;
  std::vector<at::Tensor> nchw;
  for (const auto& f : features) nchw.push_back(f.contiguous());
  const auto r = coord_rois(rois, first.scalar_type());
  const LevelRule rule = make_level_rule(args);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "roi_align_forward", [&] {
    using coord_t = opmath_t<scalar_t>;
    forward_kernel<scalar_t, coord_t><<<blocks_for(output.numel()), kThreads, 0, stream>>>(
        make_table<const scalar_t>(nchw, args.spatial_scales, rule), r.data_ptr<coord_t>(), r.size(0), first.size(0),
        first.size(1), static_cast<int>(pooled_h), static_cast<int>(pooled_w), static_cast<int>(args.sampling_ratio),
        args.aligned, output.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::vector<at::Tensor> multilevel_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                                 at::IntArrayRef heights, at::IntArrayRef widths, int64_t batch_size,
                                                 int64_t channels, const RoIAlignArgs& args) {
  c10::cuda::CUDAGuard guard(grad.device());
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const auto acc_dtype = at::toOpMathType(grad.scalar_type());
  const auto sink_dtype = deterministic ? at::kLong : acc_dtype;
  std::vector<at::Tensor> sinks;
  for (size_t l = 0; l < heights.size(); ++l)
    sinks.push_back(at::zeros({batch_size, channels, heights[l], widths[l]}, grad.options().dtype(sink_dtype)));
  at::Tensor fixed_point_scale;
  if (grad.numel() > 0) {
    const auto g = grad.contiguous();
    const auto r = coord_rois(rois, grad.scalar_type());
    const LevelRule rule = make_level_rule(args);
    if (deterministic) {
      // Every element's total is bounded by K * PH * PW * max|grad| (the bilinear weights of a
      // bin sum to at most 1), so this scale keeps all partial sums below 2^62. Computed on the
      // device: no host sync.
      const double bound = double(g.size(0)) * double(g.size(2)) * double(g.size(3));
      fixed_point_scale = (std::ldexp(1.0, 62) / (g.abs().amax().to(at::kDouble) * bound))
                              .clamp_max(std::ldexp(1.0, 62))
                              .nan_to_num(0.0, 0.0, 0.0)
                              .reshape({1});
    }
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward", [&] {
      using coord_t = opmath_t<scalar_t>;
      using acc_t = opmath_t<scalar_t>;
      const auto launch = [&](auto sink) {
        using Sink = decltype(sink);
        backward_kernel<scalar_t, coord_t, Sink><<<blocks_for(g.numel()), kThreads, 0, stream>>>(
            g.data_ptr<scalar_t>(), make_table<typename Sink::storage_t>(sinks, args.spatial_scales, rule),
            r.data_ptr<coord_t>(), r.size(0), batch_size, channels, static_cast<int>(g.size(2)),
            static_cast<int>(g.size(3)), static_cast<int>(args.sampling_ratio), args.aligned,
            deterministic ? fixed_point_scale.data_ptr<double>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (deterministic) {
        launch(GradSink<acc_t, true>{});
      } else {
        launch(GradSink<acc_t, false>{});
      }
    });
  }
  std::vector<at::Tensor> grads;
  for (auto& s : sinks) {
    at::Tensor gl = s;
    if (deterministic)
      gl = fixed_point_scale.defined() ? (s.to(at::kDouble) / fixed_point_scale.clamp_min(1e-300)) : s.to(at::kDouble);
    grads.push_back(gl.to(grad.scalar_type()));
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiffinst, CUDA, m) {
  RoIAlignEntryPoints<multilevel_forward_cuda, multilevel_backward_cuda>::register_kernels(m);
}

}  // namespace fastdiffinst
