// Schemas of every native op of fastdiffinst, and the module fastdiffinst._C. Device kernels register
// themselves in ops/<op>.cpp (CPU) and ops/cuda/<op>.cu (CUDA); fake, autograd and autocast
// registrations live in Python (fastdiffinst/ops/).
#include <Python.h>
#include <torch/library.h>

#include "ops/common/box_diffusion_math.h"
#include "ops/common/dynamic_mask_head_math.h"
#include "ops/common/roi_align_math.h"

namespace {

// The kernels' limits, exported as int attributes of fastdiffinst._C so that the Python argument
// checks read them from here (fastdiffinst/_extension.py limit()) instead of mirroring them.
struct Limit {
  const char* name;
  long value;
};
constexpr Limit kLimits[] = {
    {"MAX_SAMPLING_RATIO", fastdiffinst::roi::kMaxAdaptiveGrid},  // RoIAlign samples per bin and axis
    {"MAX_LEVELS", fastdiffinst::roi::kMaxLevels},                // multilevel_roi_align pyramid levels
    {"MASK_HEAD_MAX_CHANNELS", fastdiffinst::mask_head::kMaxChannels},
    {"MASK_HEAD_MAX_FEATURE_CHANNELS", fastdiffinst::mask_head::kMaxFeatureChannels},
    {"MASK_HEAD_MAX_LAYERS", fastdiffinst::mask_head::kMaxLayers},
};

// Adds the module's constants; false (with the Python error set) on failure.
bool add_constants(PyObject* module) {
#ifdef WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  // Lets Python tell "built without CUDA" from "CUDA kernel missing".
  if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) < 0) return false;
  for (const Limit& limit : kLimits) {
    if (PyModule_AddIntConstant(module, limit.name, limit.value) < 0) return false;
  }
  // The fake GT box of q_sample_boxes, for the check that the references use the same one
  // (tests/test_box_diffusion.py).
  double box[4];
  fastdiffinst::diffusion::fake_gt_box(box);
  PyObject* fake_box = Py_BuildValue("(dddd)", box[0], box[1], box[2], box[3]);
  // PyModule_AddObjectRef (Python >= 3.10) leaves the reference with us, whatever it returns.
  const bool added = fake_box != nullptr && PyModule_AddObjectRef(module, "FAKE_GT_BOX", fake_box) == 0;
  Py_XDECREF(fake_box);
  if (!added) return false;
  // The smallest placeholder size, for the same check.
  PyObject* min_size = PyFloat_FromDouble(fastdiffinst::diffusion::kPlaceholderMinSize);
  const bool added_min_size =
      min_size != nullptr && PyModule_AddObjectRef(module, "PLACEHOLDER_MIN_SIZE", min_size) == 0;
  Py_XDECREF(min_size);
  return added_min_size;
}

}  // namespace

// `import fastdiffinst._C` runs the static registrars below; the module itself holds constants only.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (!add_constants(module)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

TORCH_LIBRARY(fastdiffinst, m) {
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
      "int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "multilevel_roi_align(Tensor[] features, Tensor rois, float[] spatial_scales, "
      "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, bool aligned, "
      "int canonical_box_size, int canonical_level) -> Tensor");
  m.def(
      "_multilevel_roi_align_backward(Tensor grad, Tensor rois, float[] spatial_scales, "
      "SymInt[] heights, SymInt[] widths, SymInt batch_size, SymInt channels, int sampling_ratio, "
      "bool aligned, int canonical_box_size, int canonical_level) -> Tensor[]");
  m.def(
      "q_sample_boxes(Tensor gt_boxes, Tensor gt_counts, Tensor t, Tensor noise, Tensor placeholder_noise, "
      "Tensor select_index, Tensor sqrt_alphas_cumprod, Tensor sqrt_one_minus_alphas_cumprod, float scale, "
      "Tensor images_whwh) -> Tensor");
  m.def(
      "ddim_step_boxes(Tensor x_t, Tensor pred_boxes, Tensor images_whwh, Tensor keep, int t, int t_next, "
      "Tensor alphas_cumprod, float eta, float scale, Tensor noise, Tensor renew_noise) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dynamic_mask_head(Tensor mask_feats, Tensor params, Tensor image_index, Tensor? inst_xy, Tensor? inst_soi, "
      "int mask_stride, int channels, int num_layers, bool sigmoid) -> Tensor");
  m.def(
      "_dynamic_mask_head_backward(Tensor grad, Tensor mask_feats, Tensor params, Tensor image_index, "
      "Tensor? inst_xy, Tensor? inst_soi, int mask_stride, int channels, int num_layers, bool sigmoid) "
      "-> (Tensor, Tensor)");
  m.def(
      "dynamic_mask_dice_sums(Tensor mask_feats, Tensor params, Tensor image_index, Tensor gt_masks, "
      "Tensor gt_index, Tensor? inst_xy, Tensor? inst_soi, int mask_stride, int channels, int num_layers) -> Tensor");
  m.def(
      "_dynamic_mask_dice_sums_backward(Tensor grad_sums, Tensor mask_feats, Tensor params, Tensor image_index, "
      "Tensor gt_masks, Tensor gt_index, Tensor? inst_xy, Tensor? inst_soi, int mask_stride, int channels, "
      "int num_layers) -> (Tensor, Tensor)");
  m.def(
      "paste_masks(Tensor mask_probs, Tensor boxes, SymInt image_height, SymInt image_width, SymInt output_height, "
      "SymInt output_width, float threshold, int mask_stride=4) -> Tensor");
}
