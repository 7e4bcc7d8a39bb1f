// RoIAlign arithmetic shared by the CPU (ops/roi_align.cpp) and CUDA (ops/cuda/roi_align.cu)
// kernels, so the CPU parity tests cover the arithmetic the GPU runs.
//
// Semantics are torchvision's roi_align (half-pixel offset when `aligned`, adaptive sampling
// grid when sampling_ratio <= 0, samples outside [-1, size] contribute zero) and detectron2's
// ROIPooler level rule. Every function is total: NaN/Inf coordinates give an empty sample or a
// clamped level/grid, never an out-of-range index, so a CUDA kernel fed bad values stays
// memory-safe without synchronising the host for a check.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace fastdiffinst {
namespace roi {

// Largest adaptive sampling grid per bin and axis. Only boxes thousands of pixels larger than
// the feature map reach it; it bounds the work (and stops a hang) for absurd finite boxes.
constexpr int kMaxAdaptiveGrid = 1024;
// Largest number of pyramid levels multilevel_roi_align accepts.
constexpr int kMaxLevels = 8;

// Where the bins of one RoI lie on its feature map, and how densely they are sampled.
template <typename coord_t>
struct RoIGeometry {
  coord_t start_y, start_x;  // top-left corner in feature-map coordinates
  coord_t bin_h, bin_w;      // bin size
  int grid_h, grid_w;        // samples per bin along each axis
  coord_t count;             // samples per bin, max(grid_h * grid_w, 1): the averaging divisor
};

template <typename coord_t>
C10_HOST_DEVICE inline int adaptive_grid(coord_t roi_extent, int pooled, int sampling_ratio) {
  if (sampling_ratio > 0) return sampling_ratio;
  const coord_t g = ceil(roi_extent / static_cast<coord_t>(pooled));
  // ceil(extent) <= 0 samples nothing (torchvision's behaviour); NaN and Inf extents sample nothing
  // either (their samples would all be empty), so they cost no work.
  if (!(g >= coord_t(1)) || !(g < coord_t(INFINITY))) return 0;
  if (!(g <= coord_t(kMaxAdaptiveGrid))) return kMaxAdaptiveGrid;
  return static_cast<int>(g);
}

template <typename coord_t>
C10_HOST_DEVICE inline RoIGeometry<coord_t> roi_geometry(coord_t x1, coord_t y1, coord_t x2, coord_t y2,
                                                         coord_t spatial_scale, int pooled_h, int pooled_w,
                                                         int sampling_ratio, bool aligned) {
  const coord_t offset = aligned ? coord_t(0.5) : coord_t(0);
  RoIGeometry<coord_t> g;
  g.start_x = x1 * spatial_scale - offset;
  g.start_y = y1 * spatial_scale - offset;
  coord_t roi_w = x2 * spatial_scale - offset - g.start_x;
  coord_t roi_h = y2 * spatial_scale - offset - g.start_y;
  if (!aligned) {
    // Legacy (Detectron v1) behaviour: malformed RoIs are forced to be at least 1x1.
    roi_w = roi_w > coord_t(1) ? roi_w : coord_t(1);
    roi_h = roi_h > coord_t(1) ? roi_h : coord_t(1);
  }
  g.bin_h = roi_h / static_cast<coord_t>(pooled_h);
  g.bin_w = roi_w / static_cast<coord_t>(pooled_w);
  g.grid_h = adaptive_grid(roi_h, pooled_h, sampling_ratio);
  g.grid_w = adaptive_grid(roi_w, pooled_w, sampling_ratio);
  const int n = g.grid_h * g.grid_w;
  g.count = static_cast<coord_t>(n > 1 ? n : 1);
  return g;
}

// Coordinate of sample `i` (of `grid`) inside bin `bin` along one axis.
template <typename coord_t>
C10_HOST_DEVICE inline coord_t sample_coord(coord_t start, coord_t bin_size, int bin, int i, int grid) {
  return start + static_cast<coord_t>(bin) * bin_size +
         (static_cast<coord_t>(i) + coord_t(0.5)) * bin_size / static_cast<coord_t>(grid);
}

// The samples [first, last) of bin `bin` along one axis that can fall inside [-1, size]: the
// others are empty, so loops skip them (a huge box then costs what its visible part costs). One
// sample of margin on each side absorbs rounding; axis_taps still tests every sample it is given.
struct SampleRange {
  int first, last;
};

template <typename coord_t>
C10_HOST_DEVICE inline SampleRange sample_range(coord_t start, coord_t bin_size, int bin, int grid, int64_t size) {
  SampleRange r{0, grid};
  const coord_t step = bin_size / static_cast<coord_t>(grid);
  if (!(step > coord_t(0)) || !(step < coord_t(INFINITY))) return r;
  const coord_t origin = start + static_cast<coord_t>(bin) * bin_size + coord_t(0.5) * step;  // sample 0
  const coord_t lo = floor((coord_t(-1) - origin) / step) - coord_t(1);
  const coord_t hi = ceil((static_cast<coord_t>(size) - origin) / step) + coord_t(2);
  if (lo > coord_t(r.first)) r.first = lo < static_cast<coord_t>(grid) ? static_cast<int>(lo) : grid;
  if (hi < coord_t(r.last)) r.last = hi > coord_t(r.first) ? static_cast<int>(hi) : r.first;
  return r;
}

// Bilinear interpolation along one axis: the two neighbouring indices and their weights.
// A 2-D sample is empty when either axis is invalid (torchvision: outside [-1, size]).
template <typename coord_t>
struct AxisTaps {
  bool valid;
  int64_t lo, hi;
  coord_t w_lo, w_hi;
};

template <typename coord_t>
C10_HOST_DEVICE inline AxisTaps<coord_t> axis_taps(coord_t v, int64_t size) {
  AxisTaps<coord_t> t;
  // `!(inside)` so that NaN is rejected too.
  if (!(v >= coord_t(-1) && v <= static_cast<coord_t>(size)) || size <= 0) {
    t.valid = false;
    t.lo = t.hi = 0;
    t.w_lo = t.w_hi = coord_t(0);
    return t;
  }
  t.valid = true;
  if (v <= coord_t(0)) v = coord_t(0);
  t.lo = static_cast<int64_t>(v);
  if (t.lo >= size - 1) {
    t.lo = t.hi = size - 1;
    v = static_cast<coord_t>(t.lo);
  } else {
    t.hi = t.lo + 1;
  }
  const coord_t frac = v - static_cast<coord_t>(t.lo);
  t.w_lo = coord_t(1) - frac;
  t.w_hi = frac;
  return t;
}

// detectron2's ROIPooler level rule, in fp32 exactly as detectron2 evaluates it:
//   floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8)), clamped to
//   [min_level, min_level + num_levels - 1]; returns the index into the feature list.
// A box with a NaN level (one reversed side: negative area; NaN coordinates) matches no level in
// detectron2 and its output row stays zero: returned as -1.
C10_HOST_DEVICE inline int assign_level(float x1, float y1, float x2, float y2, int canonical_box_size,
                                        int canonical_level, int min_level, int num_levels) {
  const float area = (x2 - x1) * (y2 - y1);
  const float size = sqrtf(area);
  const float level =
      floorf(static_cast<float>(canonical_level) + log2f(size / static_cast<float>(canonical_box_size) + 1e-8f));
  if (level != level) return -1;
  const int max_level = min_level + num_levels - 1;
  if (level <= static_cast<float>(min_level)) return 0;
  if (level >= static_cast<float>(max_level)) return num_levels - 1;
  return static_cast<int>(level) - min_level;
}

}  // namespace roi
}  // namespace fastdiffinst
