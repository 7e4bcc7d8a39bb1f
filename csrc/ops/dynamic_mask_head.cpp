// CPU kernels of the dynamic mask head (docs/design.md §2.1): forward (logits or probabilities), the dice
// sums of training, and their backward passes, which recompute the activations from the inputs.
//
// Work is cut into tiles of kTile pixels: the per-pixel MLP runs on a tile as vector operations
// over the pixels (the channel loops are scalar, the weights broadcast), so the hot loops vectorise
// for any channel count. Each parallel task covers kChunk pixels; the chunking is fixed, so every
// result is independent of the number of threads (deterministic), and the backward needs no atomics:
//   * forward / dice sums: tasks over (instance, chunk);
//   * backward: tasks over (image, chunk), looping over that image's instances in index order, so
//     the feature gradient of a chunk is summed by one task; parameter gradients are per-(instance,
//     chunk) partials summed afterwards in chunk order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <optional>
#include <vector>

#include "ops/common/cpu_clones.h"
#include "ops/common/dynamic_mask_head_math.h"
#include "ops/common/opmath.h"

namespace fastdiffinst {
namespace {

using mask_head::Layout;

constexpr int kTile = 32;         // pixels per vector tile
constexpr int64_t kChunk = 2048;  // pixels per task (a multiple of kTile)
constexpr int kMaxHidden = mask_head::kMaxChannels;
// Activations of one tile: layer 0's input, then the input of every further layer.
constexpr int kActivations = (mask_head::kMaxInputs + (mask_head::kMaxLayers - 1) * kMaxHidden) * kTile;

FASTDIFFINST_FORCE_INLINE int64_t input_offset(const Layout& layout, int l) {
  return l == 0 ? 0 : (int64_t(layout.inputs) + int64_t(l - 1) * kMaxHidden) * kTile;
}

// ---------------------------------------------------------------------------------------------
// Tile math on accumulation-type buffers. `act` holds [inputs][kTile] followed by the hidden
// activations; the functions are instantiated for float and double and compiled per ISA.

// IN, CH and L are the layout's inputs, channels and layers when known at compile time (the
// DiffusionInst and CondInst heads), 0 otherwise: fixed sizes let the compiler unroll the channel
// loops and keep a tile's accumulators in registers.
template <int IN, int CH, int L>
struct Dims {
  const Layout& layout;
  int inputs() const { return IN ? IN : layout.inputs; }
  int channels() const { return CH ? CH : layout.channels; }
  int layers() const { return L ? L : layout.layers; }
  int fan_in(int l) const { return mask_head::fan_in(l, inputs(), channels()); }
  int fan_out(int l) const { return mask_head::fan_out(l, channels(), layers()); }
  int weight_offset(int l) const { return mask_head::weight_offset(l, inputs(), channels(), layers()); }
  int bias_offset(int l) const { return mask_head::bias_offset(l, inputs(), channels(), layers()); }
};

template <typename acc_t>
FASTDIFFINST_FORCE_INLINE void dense_tile(const acc_t* __restrict w, const acc_t* __restrict b,
                                          const acc_t* __restrict in, int fan_in, int fan_out, acc_t* __restrict out,
                                          bool relu) {
  for (int o = 0; o < fan_out; ++o) {
    acc_t acc[kTile];
    for (int t = 0; t < kTile; ++t) acc[t] = b[o];
    for (int i = 0; i < fan_in; ++i) {
      const acc_t wi = w[o * fan_in + i];
      const acc_t* __restrict x = in + i * kTile;
      for (int t = 0; t < kTile; ++t) acc[t] += wi * x[t];
    }
    acc_t* __restrict y = out + o * kTile;
    if (relu) {
      for (int t = 0; t < kTile; ++t) y[t] = acc[t] > acc_t(0) ? acc[t] : acc_t(0);
    } else {
      for (int t = 0; t < kTile; ++t) y[t] = acc[t];
    }
  }
}

// logit[t] for the tile whose layer-0 input is in act[0 .. inputs*kTile); fills the hidden activations.
template <typename acc_t, int IN, int CH, int L>
FASTDIFFINST_FORCE_INLINE void mlp_forward_tile(const Layout& layout, const acc_t* params, acc_t* act, acc_t* logit) {
  const Dims<IN, CH, L> dims{layout};
  for (int l = 0; l < dims.layers(); ++l) {
    const bool last = l == dims.layers() - 1;
    dense_tile<acc_t>(params + dims.weight_offset(l), params + dims.bias_offset(l), act + input_offset(layout, l),
                      dims.fan_in(l), dims.fan_out(l), last ? logit : act + input_offset(layout, l + 1), !last);
  }
}

// Back-propagates dlogit through the tile: adds the per-lane parameter gradients to gacc
// ([num_params][kTile]) and, when gx is given, the feature gradients (input rows from
// `first_feature` on) to gx[(i - first_feature) * gx_stride + t].
template <typename acc_t, int IN, int CH, int L>
FASTDIFFINST_FORCE_INLINE void mlp_backward_tile(const Layout& layout, const acc_t* params, const acc_t* act,
                                                 const acc_t* dlogit, acc_t* __restrict gacc, acc_t* gx,
                                                 int64_t gx_stride, int first_feature) {
  const Dims<IN, CH, L> dims{layout};
  alignas(64) acc_t delta_a[kMaxHidden * kTile];
  alignas(64) acc_t delta_b[kMaxHidden * kTile];
  acc_t* delta = delta_a;  // gradient w.r.t. layer l's pre-activation output, [fan_out][kTile]
  acc_t* below = delta_b;
  std::memcpy(delta, dlogit, sizeof(acc_t) * kTile);
  for (int l = dims.layers() - 1; l >= 0; --l) {
    const int fan_in = dims.fan_in(l), fan_out = dims.fan_out(l);
    const acc_t* __restrict w = params + dims.weight_offset(l);
    const acc_t* __restrict in = act + input_offset(layout, l);
    acc_t* __restrict gw = gacc + int64_t(dims.weight_offset(l)) * kTile;
    acc_t* __restrict gb = gacc + int64_t(dims.bias_offset(l)) * kTile;
    for (int o = 0; o < fan_out; ++o) {
      const acc_t* __restrict d = delta + o * kTile;
      for (int t = 0; t < kTile; ++t) gb[o * kTile + t] += d[t];
      for (int i = 0; i < fan_in; ++i) {
        acc_t* __restrict g = gw + int64_t(o * fan_in + i) * kTile;
        const acc_t* __restrict x = in + i * kTile;
        for (int t = 0; t < kTile; ++t) g[t] += d[t] * x[t];
      }
    }
    if (l > 0) {
      // Gradient w.r.t. this layer's input, through the ReLU that produced it.
      for (int i = 0; i < fan_in; ++i) {
        acc_t acc[kTile] = {};
        for (int o = 0; o < fan_out; ++o) {
          const acc_t wi = w[o * fan_in + i];
          const acc_t* __restrict d = delta + o * kTile;
          for (int t = 0; t < kTile; ++t) acc[t] += wi * d[t];
        }
        const acc_t* __restrict x = in + i * kTile;
        acc_t* __restrict y = below + i * kTile;
        for (int t = 0; t < kTile; ++t) y[t] = x[t] > acc_t(0) ? acc[t] : acc_t(0);
      }
      std::swap(delta, below);
    } else if (gx != nullptr) {
      for (int i = first_feature; i < fan_in; ++i) {
        acc_t* __restrict y = gx + int64_t(i - first_feature) * gx_stride;
        for (int o = 0; o < fan_out; ++o) {
          const acc_t wi = w[o * fan_in + i];
          const acc_t* __restrict d = delta + o * kTile;
          for (int t = 0; t < kTile; ++t) y[t] += wi * d[t];
        }
      }
    }
  }
}

// The fp32 and fp64 entry points, compiled per ISA (AVX-512, AVX2+FMA, baseline); the tile math is
// force-inlined into each clone. The sizes are fixed at compile time for the common heads
// (DiffusionInst 8→8→8→1, CondInst 10→8→8→1) and read from the layout otherwise.
#define FASTDIFFINST_WITH_DIMS(layout, CALL)                                            \
  if ((layout).channels == 8 && (layout).layers == 3 && (layout).inputs == 8) {         \
    CALL(8, 8, 3);                                                                      \
  } else if ((layout).channels == 8 && (layout).layers == 3 && (layout).inputs == 10) { \
    CALL(10, 8, 3);                                                                     \
  } else {                                                                              \
    CALL(0, 0, 0);                                                                      \
  }

FASTDIFFINST_CPU_CLONES_AVX512
void forward_tile_f32(const Layout& layout, const float* params, float* act, float* logit) {
#define CALL(IN, CH, L) mlp_forward_tile<float, IN, CH, L>(layout, params, act, logit)
  FASTDIFFINST_WITH_DIMS(layout, CALL)
#undef CALL
}
FASTDIFFINST_CPU_CLONES_AVX512
void forward_tile_f64(const Layout& layout, const double* params, double* act, double* logit) {
#define CALL(IN, CH, L) mlp_forward_tile<double, IN, CH, L>(layout, params, act, logit)
  FASTDIFFINST_WITH_DIMS(layout, CALL)
#undef CALL
}
FASTDIFFINST_CPU_CLONES_AVX512
void backward_tile_f32(const Layout& layout, const float* params, const float* act, const float* dlogit, float* gacc,
                       float* gx, int64_t gx_stride, int first_feature) {
#define CALL(IN, CH, L) \
  mlp_backward_tile<float, IN, CH, L>(layout, params, act, dlogit, gacc, gx, gx_stride, first_feature)
  FASTDIFFINST_WITH_DIMS(layout, CALL)
#undef CALL
}
FASTDIFFINST_CPU_CLONES_AVX512
void backward_tile_f64(const Layout& layout, const double* params, const double* act, const double* dlogit,
                       double* gacc, double* gx, int64_t gx_stride, int first_feature) {
#define CALL(IN, CH, L) \
  mlp_backward_tile<double, IN, CH, L>(layout, params, act, dlogit, gacc, gx, gx_stride, first_feature)
  FASTDIFFINST_WITH_DIMS(layout, CALL)
#undef CALL
}
#undef FASTDIFFINST_WITH_DIMS

inline void forward_tile(const Layout& l, const float* p, float* a, float* y) { forward_tile_f32(l, p, a, y); }
inline void forward_tile(const Layout& l, const double* p, double* a, double* y) { forward_tile_f64(l, p, a, y); }
inline void backward_tile(const Layout& l, const float* p, const float* a, const float* d, float* g, float* gx,
                          int64_t s, int f) {
  backward_tile_f32(l, p, a, d, g, gx, s, f);
}
inline void backward_tile(const Layout& l, const double* p, const double* a, const double* d, double* g, double* gx,
                          int64_t s, int f) {
  backward_tile_f64(l, p, a, d, g, gx, s, f);
}

// exp(x) for x <= 0 in fp32 with plain arithmetic, so that the sigmoid of a tile vectorises
// (std::exp does not): exp(x) = 2^n · exp(r), n = round(x / ln 2), |r| <= ln 2 / 2, with the
// Cephes polynomial for exp(r) on that range (about 1 ulp). Down to the smallest subnormal: x is
// clamped at -104, where exp(x) rounds to 0.
FASTDIFFINST_FORCE_INLINE float exp_fp32_nonpositive(float x) {
  x = std::min(std::max(x, -104.0f), 0.0f);
  // Round to nearest by adding and removing 1.5 * 2^23 (exact for |x / ln 2| < 2^22).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // r = x - n ln 2, with ln 2 split in two so that n · ln2_hi is exact.
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  // 2^n as 2^h · 2^(n-h), h = n / 2, each a normal number built from its exponent bits (n is in
  // [-150, 0]); the last product rounds into the subnormals when it must.
  const int32_t k = static_cast<int32_t>(n), h = k / 2;
  return y * std::bit_cast<float>((h + 127) << 23) * std::bit_cast<float>((k - h + 127) << 23);
}

FASTDIFFINST_CPU_CLONES_AVX512
void sigmoid_tile_f32(const float* __restrict x, float* __restrict y) {
  // mask_head::sigmoid's stable form: exp of -|x| only.
  for (int t = 0; t < kTile; ++t) {
    const float e = exp_fp32_nonpositive(-std::abs(x[t]));
    y[t] = x[t] >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
  }
}
void sigmoid_tile_f64(const double* __restrict x, double* __restrict y) {
  for (int t = 0; t < kTile; ++t) y[t] = mask_head::sigmoid(x[t]);
}
inline void sigmoid_tile(const float* x, float* y) { sigmoid_tile_f32(x, y); }
inline void sigmoid_tile(const double* x, double* y) { sigmoid_tile_f64(x, y); }

// Zeroes the lanes of a tile past `count` (padding).
template <typename acc_t>
inline void zero_padding(int count, acc_t* v) {
  for (int t = count; t < kTile; ++t) v[t] = acc_t(0);
}

// Sum of a tile's lanes by halving (vector adds, no long dependency chain); overwrites v.
template <typename acc_t>
FASTDIFFINST_FORCE_INLINE acc_t tile_sum(acc_t* v) {
  for (int width = kTile / 2; width > 0; width /= 2) {
    for (int t = 0; t < width; ++t) v[t] += v[t + width];
  }
  return v[0];
}

// ---------------------------------------------------------------------------------------------
// Inputs of the kernels, checked and in the layout they read.

struct Problem {
  at::Tensor feats;   // [B, C, H, W] contiguous
  at::Tensor params;  // [N, P] contiguous
  at::Tensor image_index;
  at::Tensor inst_xy, inst_soi;  // [N, 2], [N] in the accumulation type, or undefined
  Layout layout;
  int64_t batch, feature_channels, height, width, pixels, instances;
  int stride;

  bool coords() const { return inst_xy.defined(); }
  int first_feature() const { return coords() ? mask_head::kCoordChannels : 0; }
  int64_t chunks() const { return (pixels + kChunk - 1) / kChunk; }
};

Problem make_problem(const char* op, const at::Tensor& feats, const at::Tensor& params, const at::Tensor& image_index,
                     const std::optional<at::Tensor>& inst_xy, const std::optional<at::Tensor>& inst_soi,
                     int64_t mask_stride, int64_t channels, int64_t num_layers) {
  TORCH_CHECK(feats.dim() == 4, op, ": mask_feats must be [B, C, H, W], got shape ", feats.sizes());
  TORCH_CHECK(params.dim() == 2, op, ": params must be [N, P], got shape ", params.sizes());
  TORCH_CHECK(feats.scalar_type() == params.scalar_type(), op, ": params must have the dtype of mask_feats (",
              feats.scalar_type(), "), got ", params.scalar_type());
  TORCH_CHECK(image_index.scalar_type() == at::kLong && image_index.dim() == 1 && image_index.size(0) == params.size(0),
              op, ": image_index must be an int64 tensor [N] with N = params.shape[0] = ", params.size(0),
              ", got dtype ", image_index.scalar_type(), " and shape ", image_index.sizes());
  TORCH_CHECK(inst_xy.has_value() == inst_soi.has_value(), op,
              ": inst_xy and inst_soi (the relative coordinates) must be given together");
  TORCH_CHECK(channels >= 1 && channels <= mask_head::kMaxChannels, op, ": channels must be in [1, ",
              mask_head::kMaxChannels, "], got ", channels);
  TORCH_CHECK(num_layers >= 1 && num_layers <= mask_head::kMaxLayers, op, ": num_layers must be in [1, ",
              mask_head::kMaxLayers, "], got ", num_layers);
  TORCH_CHECK(feats.size(1) >= 1 && feats.size(1) <= mask_head::kMaxFeatureChannels, op, ": mask_feats must have 1 to ",
              mask_head::kMaxFeatureChannels, " channels, got ", feats.size(1));
  Problem p;
  p.batch = feats.size(0);
  p.feature_channels = feats.size(1);
  p.height = feats.size(2);
  p.width = feats.size(3);
  p.pixels = p.height * p.width;
  p.instances = params.size(0);
  p.stride = static_cast<int>(mask_stride);
  const bool coords = inst_xy.has_value();
  p.layout = Layout{static_cast<int>(p.feature_channels) + (coords ? mask_head::kCoordChannels : 0),
                    static_cast<int>(channels), static_cast<int>(num_layers)};
  TORCH_CHECK(params.size(1) == p.layout.num_params(), op, ": params must have P = ", p.layout.num_params(),
              " columns for ", p.layout.inputs, " inputs, ", channels, " channels and ", num_layers, " layers, got ",
              params.size(1));
  p.feats = feats.contiguous();
  p.params = params.contiguous();
  p.image_index = image_index.contiguous();
  const int64_t* idx = p.image_index.data_ptr<int64_t>();
  for (int64_t n = 0; n < p.instances; ++n) {
    TORCH_CHECK(idx[n] >= 0 && idx[n] < p.batch, op, ": image_index[", n, "] = ", idx[n], " is out of range [0, ",
                p.batch, ")");
  }
  if (coords) {
    TORCH_CHECK(mask_stride >= 1, op, ": mask_stride must be positive, got ", mask_stride);
    const auto acc = feats.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(inst_xy->dim() == 2 && inst_xy->size(0) == p.instances && inst_xy->size(1) == 2, op,
                ": inst_xy must be [N, 2] with N = ", p.instances, ", got shape ", inst_xy->sizes());
    TORCH_CHECK(inst_soi->dim() == 1 && inst_soi->size(0) == p.instances, op,
                ": inst_soi must be [N] with N = ", p.instances, ", got shape ", inst_soi->sizes());
    TORCH_CHECK(at::isFloatingType(inst_xy->scalar_type()) && at::isFloatingType(inst_soi->scalar_type()), op,
                ": inst_xy and inst_soi must be floating-point tensors");
    p.inst_xy = inst_xy->to(acc).contiguous();
    p.inst_soi = inst_soi->to(acc).contiguous();
  }
  return p;
}

// Pixel centres along x and y for every mask pixel (for the relative coordinates).
template <typename acc_t>
struct PixelCentres {
  std::vector<acc_t> x, y;
  PixelCentres(const Problem& p) {
    if (!p.coords()) return;
    x.resize(p.pixels);
    y.resize(p.pixels);
    for (int64_t i = 0; i < p.pixels; ++i) {
      x[i] = mask_head::pixel_centre<acc_t>(i % p.width, p.stride);
      y[i] = mask_head::pixel_centre<acc_t>(i / p.width, p.stride);
    }
  }
};

// Loads the layer-0 input of instance n for pixels [p0, p0 + count): the relative coordinates,
// then the features; lanes past `count` are zero.
template <typename scalar_t, typename acc_t>
inline void load_inputs(const Problem& p, const PixelCentres<acc_t>& centres, int64_t n, int64_t p0, int count,
                        acc_t* act) {
  const int64_t b = p.image_index.data_ptr<int64_t>()[n];
  int row = 0;
  if (p.coords()) {
    const acc_t* xy = p.inst_xy.data_ptr<acc_t>() + 2 * n;
    const acc_t soi = p.inst_soi.data_ptr<acc_t>()[n];
    for (int t = 0; t < kTile; ++t) {
      act[t] = t < count ? mask_head::relative_coord(xy[0], centres.x[p0 + t], soi) : acc_t(0);
      act[kTile + t] = t < count ? mask_head::relative_coord(xy[1], centres.y[p0 + t], soi) : acc_t(0);
    }
    row = mask_head::kCoordChannels;
  }
  const scalar_t* f = p.feats.data_ptr<scalar_t>() + b * p.feature_channels * p.pixels + p0;
  for (int64_t c = 0; c < p.feature_channels; ++c, ++row) {
    const scalar_t* src = f + c * p.pixels;
    acc_t* dst = act + row * kTile;
    if (count == kTile) {
      for (int t = 0; t < kTile; ++t) dst[t] = static_cast<acc_t>(src[t]);
    } else {
      for (int t = 0; t < kTile; ++t) dst[t] = t < count ? static_cast<acc_t>(src[t]) : acc_t(0);
    }
  }
}

template <typename scalar_t, typename acc_t>
inline void load_params(const Problem& p, int64_t n, acc_t* dst) {
  const scalar_t* src = p.params.data_ptr<scalar_t>() + n * p.layout.num_params();
  for (int k = 0; k < p.layout.num_params(); ++k) dst[k] = static_cast<acc_t>(src[k]);
}

// Room for one instance's flat parameters, for the largest head supported.
constexpr int kMaxParams =
    mask_head::kMaxInputs * kMaxHidden + (mask_head::kMaxLayers - 1) * kMaxHidden * (kMaxHidden + 1) + kMaxHidden + 1;
template <typename acc_t>
using ParamBuffer = std::array<acc_t, kMaxParams>;

// Runs the MLP of every (instance, chunk) task; `epilogue(n, chunk, p0, count, logit)` consumes
// each tile's logits (lanes >= count are padding).
template <typename scalar_t, typename acc_t, typename Epilogue>
void for_each_logit_tile(const Problem& p, const Epilogue& epilogue) {
  const PixelCentres<acc_t> centres(p);
  const int64_t chunks = p.chunks();
  at::parallel_for(0, p.instances * chunks, 1, [&](int64_t begin, int64_t end) {
    ParamBuffer<acc_t> params;
    alignas(64) acc_t act[kActivations];
    alignas(64) acc_t logit[kTile];
    int64_t loaded = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, chunk = task % chunks;
      if (n != loaded) {
        load_params<scalar_t, acc_t>(p, n, params.data());
        loaded = n;
      }
      const int64_t stop = std::min(p.pixels, (chunk + 1) * kChunk);
      for (int64_t p0 = chunk * kChunk; p0 < stop; p0 += kTile) {
        const int count = static_cast<int>(std::min<int64_t>(kTile, stop - p0));
        load_inputs<scalar_t, acc_t>(p, centres, n, p0, count, act);
        forward_tile(p.layout, params.data(), act, logit);
        epilogue(n, chunk, p0, count, logit);
      }
    }
  });
}

at::Tensor dynamic_mask_head_cpu(const at::Tensor& feats, const at::Tensor& params, const at::Tensor& image_index,
                                 const std::optional<at::Tensor>& inst_xy, const std::optional<at::Tensor>& inst_soi,
                                 int64_t mask_stride, int64_t channels, int64_t num_layers, bool sigmoid) {
  const Problem p = make_problem("dynamic_mask_head", feats, params, image_index, inst_xy, inst_soi, mask_stride,
                                 channels, num_layers);
  at::Tensor out = at::empty({p.instances, p.height, p.width}, feats.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "dynamic_mask_head_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    scalar_t* y = out.data_ptr<scalar_t>();
    for_each_logit_tile<scalar_t, acc_t>(p, [&](int64_t n, int64_t, int64_t p0, int count, const acc_t* logit) {
      scalar_t* dst = y + n * p.pixels + p0;
      if (sigmoid) {
        alignas(64) acc_t prob[kTile];
        sigmoid_tile(logit, prob);
        for (int t = 0; t < count; ++t) dst[t] = static_cast<scalar_t>(prob[t]);
      } else {
        for (int t = 0; t < count; ++t) dst[t] = static_cast<scalar_t>(logit[t]);
      }
    });
  });
  return out;
}

// Dice targets: gt_masks [G, H, W] uint8 (nonzero = foreground), gt_index [N] in [-1, G).
struct DiceTargets {
  at::Tensor masks, index;
  int64_t count;
};

DiceTargets make_targets(const char* op, const Problem& p, const at::Tensor& gt_masks, const at::Tensor& gt_index) {
  TORCH_CHECK(gt_masks.scalar_type() == at::kByte && gt_masks.dim() == 3 && gt_masks.size(1) == p.height &&
                  gt_masks.size(2) == p.width,
              op, ": gt_masks must be a uint8 tensor [G, ", p.height, ", ", p.width,
              "] (the mask-feature size), got dtype ", gt_masks.scalar_type(), " and shape ", gt_masks.sizes());
  TORCH_CHECK(gt_index.scalar_type() == at::kLong && gt_index.dim() == 1 && gt_index.size(0) == p.instances, op,
              ": gt_index must be an int64 tensor [N] with N = ", p.instances, ", got dtype ", gt_index.scalar_type(),
              " and shape ", gt_index.sizes());
  DiceTargets d{gt_masks.contiguous(), gt_index.contiguous(), gt_masks.size(0)};
  const int64_t* idx = d.index.data_ptr<int64_t>();
  for (int64_t n = 0; n < p.instances; ++n) {
    TORCH_CHECK(idx[n] >= -1 && idx[n] < d.count, op, ": gt_index[", n, "] = ", idx[n], " is out of range [-1, ",
                d.count, ") (-1 = no target)");
  }
  return d;
}

// Target of instance n at pixel p0 + t as 0/1 (lanes >= count and "no target" are 0).
template <typename acc_t>
inline void load_target(const DiceTargets& d, int64_t pixels, int64_t n, int64_t p0, int count, acc_t* g) {
  const int64_t k = d.index.data_ptr<int64_t>()[n];
  if (k < 0) {
    for (int t = 0; t < kTile; ++t) g[t] = acc_t(0);
    return;
  }
  const uint8_t* m = d.masks.data_ptr<uint8_t>() + k * pixels + p0;
  if (count == kTile) {
    for (int t = 0; t < kTile; ++t) g[t] = static_cast<acc_t>(m[t] != 0);
  } else {
    for (int t = 0; t < kTile; ++t) g[t] = t < count && m[t] != 0 ? acc_t(1) : acc_t(0);
  }
}

at::Tensor dynamic_mask_dice_sums_cpu(const at::Tensor& feats, const at::Tensor& params, const at::Tensor& image_index,
                                      const at::Tensor& gt_masks, const at::Tensor& gt_index,
                                      const std::optional<at::Tensor>& inst_xy,
                                      const std::optional<at::Tensor>& inst_soi, int64_t mask_stride, int64_t channels,
                                      int64_t num_layers) {
  const char* op = "dynamic_mask_dice_sums";
  const Problem p = make_problem(op, feats, params, image_index, inst_xy, inst_soi, mask_stride, channels, num_layers);
  const DiceTargets d = make_targets(op, p, gt_masks, gt_index);
  const auto out_dtype = feats.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Per-(instance, chunk) partial sums, reduced in chunk order below.
  at::Tensor partial = at::zeros({p.instances, p.chunks(), 3}, feats.options().dtype(at::kDouble));
  if (p.instances > 0 && p.pixels > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "dynamic_mask_dice_sums_cpu", [&] {
      using acc_t = opmath_t<scalar_t>;
      double* sums = partial.data_ptr<double>();
      for_each_logit_tile<scalar_t, acc_t>(p, [&](int64_t n, int64_t chunk, int64_t p0, int count, const acc_t* logit) {
        alignas(64) acc_t g[kTile], prob[kTile], pg[kTile], pp[kTile];
        load_target(d, p.pixels, n, p0, count, g);
        sigmoid_tile(logit, prob);
        zero_padding(count, prob);
        for (int t = 0; t < kTile; ++t) {
          pg[t] = prob[t] * g[t];
          pp[t] = prob[t] * prob[t];
        }
        double* s = sums + (n * p.chunks() + chunk) * 3;
        s[0] += tile_sum(pg);
        s[1] += tile_sum(pp);
        s[2] += tile_sum(g);
      });
    });
  }
  return partial.sum(1).to(out_dtype);
}

// ---------------------------------------------------------------------------------------------
// Backward: tasks over (image, chunk); the upstream gradient of each tile's logits comes from
// `upstream(n, p0, count, logit, dlogit)`.

template <typename scalar_t, typename acc_t, typename Upstream>
std::tuple<at::Tensor, at::Tensor> backward_impl(const Problem& p, const Upstream& upstream) {
  at::Tensor grad_feats = at::empty_like(p.feats);
  at::Tensor grad_params = at::empty_like(p.params);
  const int64_t num_params = p.layout.num_params(), chunks = p.chunks();
  const auto acc_dtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  at::Tensor partial = at::empty({p.instances, chunks, num_params}, p.params.options().dtype(acc_dtype));
  // Instances grouped by image, in index order within an image (counting sort).
  std::vector<int64_t> offsets(p.batch + 1, 0), order(p.instances);
  const int64_t* image = p.image_index.data_ptr<int64_t>();
  for (int64_t n = 0; n < p.instances; ++n) ++offsets[image[n] + 1];
  for (int64_t b = 0; b < p.batch; ++b) offsets[b + 1] += offsets[b];
  {
    std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
    for (int64_t n = 0; n < p.instances; ++n) order[next[image[n]]++] = n;
  }
  const PixelCentres<acc_t> centres(p);
  scalar_t* gf = grad_feats.data_ptr<scalar_t>();
  acc_t* gp = partial.data_ptr<acc_t>();
  at::parallel_for(0, p.batch * chunks, 1, [&](int64_t begin, int64_t end) {
    ParamBuffer<acc_t> params;
    alignas(64) acc_t act[kActivations];
    alignas(64) acc_t logit[kTile];
    alignas(64) acc_t dlogit[kTile];
    std::vector<acc_t> gacc(num_params * kTile);
    std::vector<acc_t> gx(p.feature_channels * kChunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, chunk = task % chunks;
      const int64_t start = chunk * kChunk, stop = std::min(p.pixels, start + kChunk), len = stop - start;
      std::fill(gx.begin(), gx.end(), acc_t(0));
      for (int64_t j = offsets[b]; j < offsets[b + 1]; ++j) {
        const int64_t n = order[j];
        load_params<scalar_t, acc_t>(p, n, params.data());
        std::fill(gacc.begin(), gacc.end(), acc_t(0));
        for (int64_t p0 = start; p0 < stop; p0 += kTile) {
          const int count = static_cast<int>(std::min<int64_t>(kTile, stop - p0));
          load_inputs<scalar_t, acc_t>(p, centres, n, p0, count, act);
          forward_tile(p.layout, params.data(), act, logit);
          upstream(n, p0, count, logit, dlogit);
          backward_tile(p.layout, params.data(), act, dlogit, gacc.data(), gx.data() + (p0 - start), kChunk,
                        p.first_feature());
        }
        acc_t* out = gp + (n * chunks + chunk) * num_params;
        for (int64_t k = 0; k < num_params; ++k) {
          acc_t s = 0;
          for (int t = 0; t < kTile; ++t) s += gacc[k * kTile + t];
          out[k] = s;
        }
      }
      for (int64_t c = 0; c < p.feature_channels; ++c) {
        scalar_t* dst = gf + (b * p.feature_channels + c) * p.pixels + start;
        const acc_t* src = gx.data() + c * kChunk;
        for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<scalar_t>(src[i]);
      }
    }
  });
  if (p.instances > 0) grad_params.copy_(partial.sum(1));
  return {grad_feats, grad_params};
}

std::tuple<at::Tensor, at::Tensor> dynamic_mask_head_backward_cpu(
    const at::Tensor& grad, const at::Tensor& feats, const at::Tensor& params, const at::Tensor& image_index,
    const std::optional<at::Tensor>& inst_xy, const std::optional<at::Tensor>& inst_soi, int64_t mask_stride,
    int64_t channels, int64_t num_layers, bool sigmoid) {
  const char* op = "_dynamic_mask_head_backward";
  const Problem p = make_problem(op, feats, params, image_index, inst_xy, inst_soi, mask_stride, channels, num_layers);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == p.instances && grad.size(1) == p.height && grad.size(2) == p.width, op,
              ": grad must be [N, H, W] = [", p.instances, ", ", p.height, ", ", p.width, "], got shape ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == feats.scalar_type(), op, ": grad must have the dtype of mask_feats (",
              feats.scalar_type(), "), got ", grad.scalar_type());
  const at::Tensor g = grad.contiguous();
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "dynamic_mask_head_backward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* gy = g.data_ptr<scalar_t>();
    result =
        backward_impl<scalar_t, acc_t>(p, [&](int64_t n, int64_t p0, int count, const acc_t* logit, acc_t* dlogit) {
          const scalar_t* src = gy + n * p.pixels + p0;
          for (int t = 0; t < count; ++t) dlogit[t] = static_cast<acc_t>(src[t]);
          zero_padding(count, dlogit);
          if (sigmoid) {
            alignas(64) acc_t prob[kTile];
            sigmoid_tile(logit, prob);
            for (int t = 0; t < kTile; ++t) dlogit[t] *= prob[t] * (acc_t(1) - prob[t]);
          }
        });
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor> dynamic_mask_dice_sums_backward_cpu(
    const at::Tensor& grad_sums, const at::Tensor& feats, const at::Tensor& params, const at::Tensor& image_index,
    const at::Tensor& gt_masks, const at::Tensor& gt_index, const std::optional<at::Tensor>& inst_xy,
    const std::optional<at::Tensor>& inst_soi, int64_t mask_stride, int64_t channels, int64_t num_layers) {
  const char* op = "_dynamic_mask_dice_sums_backward";
  const Problem p = make_problem(op, feats, params, image_index, inst_xy, inst_soi, mask_stride, channels, num_layers);
  const DiceTargets d = make_targets(op, p, gt_masks, gt_index);
  TORCH_CHECK(grad_sums.dim() == 2 && grad_sums.size(0) == p.instances && grad_sums.size(1) == 3, op,
              ": grad_sums must be [N, 3] with N = ", p.instances, ", got shape ", grad_sums.sizes());
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "dynamic_mask_dice_backward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const at::Tensor gs = grad_sums.to(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat).contiguous();
    const acc_t* gsum = gs.data_ptr<acc_t>();
    result =
        backward_impl<scalar_t, acc_t>(p, [&](int64_t n, int64_t p0, int count, const acc_t* logit, acc_t* dlogit) {
          // d/dp of (gA Σ p g + gB Σ p²) = gA g + 2 gB p; Σ g² does not depend on the logits.
          const acc_t ga = gsum[3 * n], gb = gsum[3 * n + 1];
          alignas(64) acc_t target[kTile], prob[kTile];
          load_target(d, p.pixels, n, p0, count, target);
          sigmoid_tile(logit, prob);
          for (int t = 0; t < kTile; ++t) {
            dlogit[t] = (ga * target[t] + acc_t(2) * gb * prob[t]) * prob[t] * (acc_t(1) - prob[t]);
          }
          zero_padding(count, dlogit);
        });
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiffinst, CPU, m) {
  m.impl("dynamic_mask_head", TORCH_FN(dynamic_mask_head_cpu));
  m.impl("_dynamic_mask_head_backward", TORCH_FN(dynamic_mask_head_backward_cpu));
  m.impl("dynamic_mask_dice_sums", TORCH_FN(dynamic_mask_dice_sums_cpu));
  m.impl("_dynamic_mask_dice_sums_backward", TORCH_FN(dynamic_mask_dice_sums_backward_cpu));
}

}  // namespace fastdiffinst
