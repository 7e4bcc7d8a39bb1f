// The dynamic mask head of CondInst / DiffusionInst: the layout of an instance's flat parameter
// vector and the per-pixel inputs. Used by the CPU kernels; kernels/dynamic_mask_head.py mirrors it
// for the Triton kernels and fastdiffinst/ops/dynamic_mask_head.py for the checks.
#pragma once

#include <cmath>

namespace fastdiffinst {
namespace mask_head {

constexpr int kMaxChannels = 16;         // hidden width
constexpr int kMaxFeatureChannels = 64;  // mask-feature channels
constexpr int kMaxLayers = 4;
constexpr int kCoordChannels = 2;  // CondInst's relative coordinates (x, y), before the features
constexpr int kMaxInputs = kMaxFeatureChannels + kCoordChannels;

// Flat parameters of one instance, AdelaiDet order: all weights, then all biases,
// [W0 | W1 | ... | W_last | b0 | b1 | ... | b_last], each weight row-major [out, in]; layer 0 takes
// `inputs` values, the hidden layers `channels`, and the last layer has one output.
constexpr int fan_in(int l, int inputs, int channels) { return l == 0 ? inputs : channels; }
constexpr int fan_out(int l, int channels, int layers) { return l == layers - 1 ? 1 : channels; }
constexpr int weight_offset(int l, int inputs, int channels, int layers) {
  int offset = 0;
  for (int k = 0; k < l; ++k) offset += fan_in(k, inputs, channels) * fan_out(k, channels, layers);
  return offset;
}
constexpr int bias_offset(int l, int inputs, int channels, int layers) {
  int offset = weight_offset(layers, inputs, channels, layers);
  for (int k = 0; k < l; ++k) offset += fan_out(k, channels, layers);
  return offset;
}

struct Layout {
  int inputs;    // width of layer 0's input: the feature channels (+ 2 coordinate channels)
  int channels;  // hidden width
  int layers;

  int num_params() const { return bias_offset(layers, inputs, channels, layers); }
};

// Centre of mask pixel `index` along one axis, in image coordinates (AdelaiDet compute_locations).
template <typename T>
inline T pixel_centre(long index, int stride) {
  return static_cast<T>(index * stride + stride / 2);
}

// CondInst's relative coordinate: (instance location - pixel centre) / size of interest. A
// division, not a multiplication by the reciprocal, to round like the official code.
template <typename T>
inline T relative_coord(T instance, T centre, T size_of_interest) {
  return (instance - centre) / size_of_interest;
}

// 1 / (1 + exp(-x)), as exp(x) / (1 + exp(x)) for x < 0 so that tiny probabilities survive.
template <typename T>
inline T sigmoid(T x) {
  const T e = std::exp(-std::abs(x));
  return x >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

}  // namespace mask_head
}  // namespace fastdiffinst
