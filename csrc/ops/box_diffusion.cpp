// CPU kernels of q_sample_boxes (training corruption) and ddim_step_boxes (DDIM update with box
// renewal), for any batch size and with fixed output shapes. Arithmetic in float64, shared with
// the CUDA kernels through ops/common/box_diffusion_math.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>

#include "ops/box_diffusion_host.h"
#include "ops/common/box_diffusion_math.h"
#include "ops/common/cpu_clones.h"

namespace fastdiffinst {
namespace {

// True if any of `values` has an all-ones exponent (NaN/Inf). The scan ORs integer tests, which
// the compiler vectorises (a floating-point reduction it may not reorder).
template <typename bits_t, typename value_t>
bool any_exponent_all_ones(const value_t* values, int64_t n, bits_t exponent_mask) {
  static_assert(sizeof(bits_t) == sizeof(value_t));
  bits_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    bits_t bits;
    std::memcpy(&bits, values + i, sizeof(bits));
    bad |= static_cast<bits_t>((bits & exponent_mask) == exponent_mask);
  }
  return bad != 0;
}

// Index of the first NaN/Inf element of `input`, or -1.
int64_t first_non_finite(const Float64Input& input) {
  const auto& view = input.view();
  const int64_t n = input.tensor().numel();
  using Storage = diffusion::Float64View::Storage;
  if (view.storage() == Storage::kDouble &&
      !any_exponent_all_ones<uint64_t>(static_cast<const double*>(view.data()), n, 0x7ff0000000000000ULL))
    return -1;
  if (view.storage() == Storage::kFloat &&
      !any_exponent_all_ones<uint32_t>(static_cast<const float*>(view.data()), n, 0x7f800000U))
    return -1;
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(view[i])) return i;
  return -1;
}

// x * 0 is NaN exactly when x is not finite, so one test covers a whole row.
inline bool all_finite(const double* v, int n) {
  double poison = 0.0;
  for (int j = 0; j < n; ++j) poison += v[j] * 0.0;
  return poison == 0.0;
}

// Raises naming `name[b, i]` (rows of 4 numbers, `per_image` rows per image; -1 for [B, 4] inputs,
// named `name[b]`) if `input` holds a NaN/Inf.
void check_finite(const Float64Input& input, int64_t per_image, const char* op, const char* name) {
  const int64_t index = first_non_finite(input);
  if (index < 0) return;
  const int64_t row = index / 4;
  if (per_image > 0) {
    TORCH_CHECK(false, op, ": ", name, "[", row / per_image, ", ", row % per_image, "] must be finite");
  }
  TORCH_CHECK(false, op, ": ", name, "[", row, "] must be finite");
}

// images_whwh [B, 4]: finite, positive image sizes.
void check_positive_sizes(const Float64Input& whwh, const char* op) {
  check_finite(whwh, -1, op, "images_whwh");
  for (int64_t b = 0; 4 * b < whwh.tensor().numel(); ++b) {
    double image_whwh[4];
    whwh.view().row4(b, image_whwh);
    TORCH_CHECK(image_whwh[0] > 0 && image_whwh[1] > 0 && image_whwh[2] > 0 && image_whwh[3] > 0, op, ": images_whwh[",
                b, "] must hold positive sizes, got (", image_whwh[0], ", ", image_whwh[1], ", ", image_whwh[2], ", ",
                image_whwh[3], ")");
  }
}

// Problems this small run on the calling thread; waking the pool costs more than the work.
constexpr int64_t kGrain = 4096;

// Training corruption of images [begin, end) (see q_sample_boxes_cpu, which has checked every value:
// exceptions must not cross the multi-versioned function).
struct QSampleImages {
  const diffusion::Float64View gt_boxes;  // [B, G, 4] normalised cxcywh
  const diffusion::Float64View noise;     // [B, N, 4]
  const diffusion::Float64View placeholder_noise;
  const diffusion::Float64View images_whwh;  // [B, 4]
  const diffusion::Float64View sqrt_alphas_cumprod;
  const diffusion::Float64View sqrt_one_minus_alphas_cumprod;
  const int64_t* gt_counts;     // [B]
  const int64_t* t;             // [B]
  const int64_t* select_index;  // [B, N]
  int64_t max_gt, proposals;
  double scale;
  double* out;  // [B, N, 4] absolute xyxy
};

FASTDIFFINST_CPU_CLONES
void q_sample_images(const QSampleImages& a, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
    double image_whwh[4], x0[4], eps[4];
    a.images_whwh.row4(b, image_whwh);
    const double sqrt_alpha = a.sqrt_alphas_cumprod[a.t[b]];
    const double sqrt_one_minus_alpha = a.sqrt_one_minus_alphas_cumprod[a.t[b]];
    for (int64_t i = 0; i < a.proposals; ++i) {
      const int64_t k = b * a.proposals + i;
      diffusion::start_box(
          a.select_index[k], a.gt_counts[b], [&](double* draw) { a.placeholder_noise.row4(k, draw); },
          [&](int64_t select, double* box) { a.gt_boxes.row4(b * a.max_gt + select, box); }, x0);
      a.noise.row4(k, eps);
      diffusion::q_sample_box(x0, eps, sqrt_alpha, sqrt_one_minus_alpha, a.scale, image_whwh, a.out + 4 * k);
    }
  }
}

at::Tensor q_sample_boxes_cpu(const at::Tensor& gt_boxes, const at::Tensor& gt_counts, const at::Tensor& t,
                              const at::Tensor& noise, const at::Tensor& placeholder_noise,
                              const at::Tensor& select_index, const at::Tensor& sqrt_alphas_cumprod,
                              const at::Tensor& sqrt_one_minus_alphas_cumprod, double scale,
                              const at::Tensor& images_whwh) {
  constexpr const char* op = "q_sample_boxes";
  const auto s = check_q_sample_inputs(gt_boxes, gt_counts, t, noise, placeholder_noise, select_index,
                                       sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, scale, images_whwh);
  const Float64Input gt(gt_boxes), eps(noise), draws(placeholder_noise), whwh(images_whwh);
  const Float64Input sa_input(sqrt_alphas_cumprod), s1a_input(sqrt_one_minus_alphas_cumprod);
  const auto &sa = sa_input.view(), &s1a = s1a_input.view();
  const auto counts = gt_counts.contiguous(), steps = t.contiguous(), select = select_index.contiguous();
  const int64_t *count_p = counts.data_ptr<int64_t>(), *t_p = steps.data_ptr<int64_t>();
  const int64_t* sel_p = select.data_ptr<int64_t>();
  // The value checks name the arguments of fastdiffinst.ops.q_sample_boxes (the draws come in a
  // QSampleDraws), whose CPU path makes no value check of its own; its CUDA path has the same
  // messages (fastdiffinst/ops/box_diffusion.py).
  for (int64_t b = 0; b < s.batch; ++b) {
    TORCH_CHECK(count_p[b] >= 0 && count_p[b] <= s.max_gt, op, ": gt_counts[", b, "] must be in [0, G = ", s.max_gt,
                "], got ", count_p[b]);
    TORCH_CHECK(t_p[b] >= 0 && t_p[b] < s.timesteps, op, ": draws.t[", b, "] must be in [0, ", s.timesteps, "), got ",
                t_p[b]);
    // An image without GT has one (fake) box, index 0.
    const int64_t available = count_p[b] > 0 ? count_p[b] : 1;
    for (int64_t i = 0; i < s.proposals; ++i) {
      const int64_t sel = sel_p[b * s.proposals + i];
      TORCH_CHECK(sel >= -1 && sel < available, op, ": draws.select_index[", b, ", ", i, "] must be -1 or in [0, ",
                  available, "), got ", sel);
    }
    for (int64_t g = 0; g < count_p[b]; ++g) {
      double box[4];
      gt.view().row4(b * s.max_gt + g, box);
      TORCH_CHECK(all_finite(box, 4), op, ": gt_boxes[", b, ", ", g, "] must be finite");
    }
    const int64_t step = t_p[b];  // the schedule entries this call reads
    TORCH_CHECK(sa[step] >= 0 && sa[step] <= 1 && s1a[step] >= 0 && s1a[step] <= 1, op,
                ": the schedule must hold values in [0, 1], got sqrt_alphas_cumprod[", step, "] = ", sa[step],
                " and sqrt_one_minus_alphas_cumprod[", step, "] = ", s1a[step]);
  }
  check_positive_sizes(whwh, op);
  // Every draw is checked, used or not: a non-finite draw is a bug upstream.
  check_finite(eps, s.proposals, op, "draws.noise");
  check_finite(draws, s.proposals, op, "draws.placeholder_noise");

  auto out = at::empty({s.batch, s.proposals, 4}, gt_boxes.options().dtype(at::kDouble));
  const QSampleImages images{.gt_boxes = gt.view(),
                             .noise = eps.view(),
                             .placeholder_noise = draws.view(),
                             .images_whwh = whwh.view(),
                             .sqrt_alphas_cumprod = sa,
                             .sqrt_one_minus_alphas_cumprod = s1a,
                             .gt_counts = count_p,
                             .t = t_p,
                             .select_index = sel_p,
                             .max_gt = s.max_gt,
                             .proposals = s.proposals,
                             .scale = scale,
                             .out = out.data_ptr<double>()};
  at::parallel_for(0, s.batch, std::max<int64_t>(1, kGrain / std::max<int64_t>(s.proposals, 1)),
                   [&](int64_t begin, int64_t end) { q_sample_images(images, begin, end); });
  return out;
}

// One DDIM step for images [begin, end) (see ddim_step_boxes_cpu, which has checked every value:
// exceptions must not cross the multi-versioned function).
struct DDIMImages {
  const diffusion::Float64View x_t;          // [B, N, 4] diffusion space
  const diffusion::Float64View pred_boxes;   // [B, N, 4] absolute xyxy
  const diffusion::Float64View images_whwh;  // [B, 4]
  const diffusion::Float64View noise;        // [B, N, 4] the eta noise of kept slot p: noise[b, p]
  const diffusion::Float64View renew_noise;  // [B, N, 4] the renewed slots
  const bool* keep;                          // [B, N]
  diffusion::DDIMCoefficients coefficients;
  int64_t t_next;
  double scale;
  int64_t proposals;
  double* x0;          // [B, N, 4] outputs
  double* x_next;      // [B, N, 4]
  double* next_boxes;  // [B, N, 4]
  int64_t* num_kept;   // [B]
};

FASTDIFFINST_CPU_CLONES
void ddim_images(const DDIMImages& a, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
    const int64_t base = b * a.proposals;
    double image_whwh[4], row[4];
    a.images_whwh.row4(b, image_whwh);
    const double inv_whwh[4] = {1.0 / image_whwh[0], 1.0 / image_whwh[1], 1.0 / image_whwh[2], 1.0 / image_whwh[3]};
    double* x0 = a.x0 + 4 * base;
    double* x_next = a.x_next + 4 * base;
    int64_t kept = 0;
    for (int64_t i = 0; i < a.proposals; ++i) {
      a.pred_boxes.row4(base + i, row);
      diffusion::box_to_signal(row, inv_whwh, a.scale, x0 + 4 * i);
      kept += a.keep[base + i] ? 1 : 0;
    }
    a.num_kept[b] = kept;
    if (a.t_next < 0) {
      // The final step returns x̂0 for every proposal, no renewal.
      for (int64_t i = 0; i < 4 * a.proposals; ++i) x_next[i] = x0[i];
    } else {
      // Kept proposals move to the front in their order; slot p's eta noise is noise[b, p].
      int64_t p = 0;
      double noise_row[4];
      for (int64_t i = 0; i < a.proposals; ++i) {
        if (!a.keep[base + i]) continue;
        a.x_t.row4(base + i, row);
        a.noise.row4(base + p, noise_row);
        diffusion::ddim_update(row, x0 + 4 * i, noise_row, a.coefficients, x_next + 4 * p);
        ++p;
      }
      for (; p < a.proposals; ++p) a.renew_noise.row4(base + p, x_next + 4 * p);
    }
    for (int64_t i = 0; i < a.proposals; ++i)
      diffusion::signal_to_box(x_next + 4 * i, image_whwh, a.scale, a.next_boxes + 4 * (base + i));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ddim_step_boxes_cpu(
    const at::Tensor& x_t, const at::Tensor& pred_boxes, const at::Tensor& images_whwh, const at::Tensor& keep,
    int64_t t, int64_t t_next, const at::Tensor& alphas_cumprod, double eta, double scale, const at::Tensor& noise,
    const at::Tensor& renew_noise) {
  constexpr const char* op = "ddim_step_boxes";
  check_ddim_inputs(x_t, pred_boxes, images_whwh, keep, t, t_next, alphas_cumprod, eta, scale, noise, renew_noise);
  const int64_t batch = x_t.size(0), proposals = x_t.size(1);
  const Float64Input xt(x_t), pred(pred_boxes), whwh(images_whwh), z(noise), fresh(renew_noise), ac(alphas_cumprod);
  const auto keep_c = keep.contiguous();
  const double alpha = ac.view()[t], alpha_next = t_next >= 0 ? ac.view()[t_next] : 1.0;
  TORCH_CHECK(alpha > 0 && alpha < 1, op, ": alphas_cumprod[t = ", t, "] must be in (0, 1), got ", alpha);
  TORCH_CHECK(alpha_next > 0 && alpha_next <= 1, op, ": alphas_cumprod[t_next = ", t_next, "] must be in (0, 1], got ",
              alpha_next);
  const auto k = diffusion::ddim_coefficients(alpha, alpha_next, eta);
  TORCH_CHECK(k.c == k.c, op, ": eta = ", eta, " is too large for the step ", t, " -> ", t_next,
              " (1 - alphas_cumprod[t_next] - sigma^2 < 0)");
  check_positive_sizes(whwh, op);
  // Every row is checked, used or not: a non-finite draw is a bug upstream.
  check_finite(pred, proposals, op, "pred_boxes");
  check_finite(xt, proposals, op, "x_t");
  check_finite(z, proposals, op, "noise");
  check_finite(fresh, proposals, op, "renew_noise");

  const auto options = x_t.options().dtype(at::kDouble);
  auto x0 = at::empty({batch, proposals, 4}, options);
  auto x_next = at::empty({batch, proposals, 4}, options);
  auto next_boxes = at::empty({batch, proposals, 4}, options);
  auto num_kept = at::empty({batch}, options.dtype(at::kLong));
  const DDIMImages images{.x_t = xt.view(),
                          .pred_boxes = pred.view(),
                          .images_whwh = whwh.view(),
                          .noise = z.view(),
                          .renew_noise = fresh.view(),
                          .keep = keep_c.data_ptr<bool>(),
                          .coefficients = k,
                          .t_next = t_next,
                          .scale = scale,
                          .proposals = proposals,
                          .x0 = x0.data_ptr<double>(),
                          .x_next = x_next.data_ptr<double>(),
                          .next_boxes = next_boxes.data_ptr<double>(),
                          .num_kept = num_kept.data_ptr<int64_t>()};
  at::parallel_for(0, batch, std::max<int64_t>(1, kGrain / std::max<int64_t>(proposals, 1)),
                   [&](int64_t begin, int64_t end) { ddim_images(images, begin, end); });
  return {x_next, x0, next_boxes, num_kept};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiffinst, CPU, m) { register_box_diffusion_kernels<q_sample_boxes_cpu, ddim_step_boxes_cpu>(m); }

}  // namespace fastdiffinst
