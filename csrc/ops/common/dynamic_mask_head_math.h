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
constexpr int kCoordChannels = 2;        // CondInst's relative coordinates (x, y), before the features
constexpr int kMaxInputs = kMaxFeatureChannels + kCoordChannels;

// Flat parameters of one instance, AdelaiDet order: all weights, then all biases,
// [W0 | W1 | ... | W_last | b0 | b1 | ... | b_last], each weight row-major [out, in].
struct Layout {
  int inputs;    // width of layer 0's input: the feature channels (+ 2 coordinate channels)
  int channels;  // hidden width
  int layers;

  int fan_in(int l) const { return l == 0 ? inputs : channels; }
  int fan_out(int l) const { return l == layers - 1 ? 1 : channels; }
  int weight_offset(int l) const {
    int offset = 0;
    for (int k = 0; k < l; ++k) offset += fan_in(k) * fan_out(k);
    return offset;
  }
  int bias_offset(int l) const {
    int offset = weight_offset(layers);
    for (int k = 0; k < l; ++k) offset += fan_out(k);
    return offset;
  }
  int num_params() const { return bias_offset(layers); }
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

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

}  // namespace mask_head
}  // namespace fastdiffinst
