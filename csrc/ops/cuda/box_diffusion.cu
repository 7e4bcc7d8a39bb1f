// CUDA kernels of q_sample_boxes and ddim_step_boxes: fixed shapes, no host synchronisation.
// Arithmetic in float64, shared with the CPU kernels (ops/common/box_diffusion_math.h); floating
// inputs are read in their own storage type (no conversion launches), so a call is one launch.
//
// Bad values never read out of bounds: t and select_index are clamped to their ranges and a
// gt_counts outside [0, G] is clamped (fastdiffinst.ops.set_input_checks(True) raises instead).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "ops/box_diffusion_host.h"
#include "ops/common/box_diffusion_math.h"

namespace fastdiffinst {
namespace {

constexpr int kThreads = 256;

__device__ inline int64_t clamp_index(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

using diffusion::Float64View;

__global__ void q_sample_kernel(Float64View gt, const int64_t* __restrict__ counts, const int64_t* __restrict__ steps,
                                Float64View eps, Float64View draws, const int64_t* __restrict__ select, Float64View sa,
                                Float64View s1a, Float64View whwh, int64_t batch, int64_t max_gt, int64_t proposals,
                                int64_t timesteps, double scale, double* __restrict__ out) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= batch * proposals) return;
  const int64_t b = k / proposals;
  const int64_t count = clamp_index(counts[b], 0, max_gt);
  const int64_t step = clamp_index(steps[b], 0, timesteps - 1);
  double x0[4], noise[4], image_whwh[4];
  diffusion::start_box(
      select[k], count, [&](double* draw) { draws.row4(k, draw); },
      [&](int64_t sel, double* box) { gt.row4(b * max_gt + clamp_index(sel, 0, count - 1), box); }, x0);
  eps.row4(k, noise);
  whwh.row4(b, image_whwh);
  diffusion::q_sample_box(x0, noise, sa[step], s1a[step], scale, image_whwh, out + 4 * k);
}

// One block per image. Kept proposals are compacted to the front in order with a block-wide
// exclusive scan over chunks of kThreads proposals.
__global__ void ddim_kernel(Float64View x_t, Float64View pred, Float64View whwh, const bool* __restrict__ keep,
                            Float64View z, Float64View fresh, Float64View alphas_cumprod, int64_t t, int64_t t_next,
                            double eta, double scale, int64_t proposals, double* __restrict__ x0,
                            double* __restrict__ x_next, double* __restrict__ next_boxes,
                            int64_t* __restrict__ num_kept) {
  __shared__ int64_t scan[kThreads];
  const int64_t b = blockIdx.x;
  const int64_t base = b * proposals;
  double image_whwh[4];
  whwh.row4(b, image_whwh);
  const double inv_whwh[4] = {1.0 / image_whwh[0], 1.0 / image_whwh[1], 1.0 / image_whwh[2], 1.0 / image_whwh[3]};
  const double alpha_next = t_next >= 0 ? alphas_cumprod[t_next] : 1.0;
  const auto k = diffusion::ddim_coefficients(alphas_cumprod[t], alpha_next, eta);
  int64_t carry = 0;
  for (int64_t chunk = 0; chunk < proposals; chunk += kThreads) {
    const int64_t i = chunk + threadIdx.x;
    const bool kept = i < proposals && keep[base + i];
    if (i < proposals) {
      double box[4];
      pred.row4(base + i, box);
      diffusion::box_to_signal(box, inv_whwh, scale, x0 + 4 * (base + i));
    }
    // Hillis-Steele inclusive scan of the keep flags of this chunk.
    scan[threadIdx.x] = kept ? 1 : 0;
    __syncthreads();
    for (int offset = 1; offset < kThreads; offset <<= 1) {
      const int64_t add = threadIdx.x >= offset ? scan[threadIdx.x - offset] : 0;
      __syncthreads();
      scan[threadIdx.x] += add;
      __syncthreads();
    }
    const int64_t slot = carry + scan[threadIdx.x] - (kept ? 1 : 0);
    if (i < proposals) {
      if (t_next < 0) {
        for (int j = 0; j < 4; ++j) x_next[4 * (base + i) + j] = x0[4 * (base + i) + j];
      } else if (kept) {
        double state[4], noise[4];
        x_t.row4(base + i, state);
        z.row4(base + slot, noise);
        diffusion::ddim_update(state, x0 + 4 * (base + i), noise, k, x_next + 4 * (base + slot));
      }
    }
    carry += scan[kThreads - 1];
    __syncthreads();
  }
  if (threadIdx.x == 0) num_kept[b] = carry;
  for (int64_t p = threadIdx.x; p < proposals; p += kThreads) {
    if (t_next >= 0 && p >= carry) fresh.row4(base + p, x_next + 4 * (base + p));
  }
  __syncthreads();  // x_next rows are written by other threads of the block
  for (int64_t p = threadIdx.x; p < proposals; p += kThreads)
    diffusion::signal_to_box(x_next + 4 * (base + p), image_whwh, scale, next_boxes + 4 * (base + p));
}

at::Tensor q_sample_boxes_cuda(const at::Tensor& gt_boxes, const at::Tensor& gt_counts, const at::Tensor& t,
                               const at::Tensor& noise, const at::Tensor& placeholder_noise,
                               const at::Tensor& select_index, const at::Tensor& sqrt_alphas_cumprod,
                               const at::Tensor& sqrt_one_minus_alphas_cumprod, double scale,
                               const at::Tensor& images_whwh) {
  const auto s = check_q_sample_inputs(gt_boxes, gt_counts, t, noise, placeholder_noise, select_index,
                                       sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, scale, images_whwh);
  c10::cuda::CUDAGuard guard(gt_boxes.device());
  const Float64Input gt(gt_boxes), eps(noise), draws(placeholder_noise), whwh(images_whwh);
  const Float64Input sa(sqrt_alphas_cumprod), s1a(sqrt_one_minus_alphas_cumprod);
  const auto counts = gt_counts.contiguous(), steps = t.contiguous(), select = select_index.contiguous();
  auto out = at::empty({s.batch, s.proposals, 4}, gt_boxes.options().dtype(at::kDouble));
  const int64_t n = s.batch * s.proposals;
  if (n == 0) return out;
  q_sample_kernel<<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0,
                    c10::cuda::getCurrentCUDAStream()>>>(gt.view(), counts.data_ptr<int64_t>(),
                                                         steps.data_ptr<int64_t>(), eps.view(), draws.view(),
                                                         select.data_ptr<int64_t>(), sa.view(), s1a.view(), whwh.view(),
                                                         s.batch, s.max_gt, s.proposals, s.timesteps, scale,
                                                         out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ddim_step_boxes_cuda(
    const at::Tensor& x_t, const at::Tensor& pred_boxes, const at::Tensor& images_whwh, const at::Tensor& keep,
    int64_t t, int64_t t_next, const at::Tensor& alphas_cumprod, double eta, double scale, const at::Tensor& noise,
    const at::Tensor& renew_noise) {
  check_ddim_inputs(x_t, pred_boxes, images_whwh, keep, t, t_next, alphas_cumprod, eta, scale, noise, renew_noise);
  c10::cuda::CUDAGuard guard(x_t.device());
  const int64_t batch = x_t.size(0), proposals = x_t.size(1);
  const Float64Input xt(x_t), pred(pred_boxes), whwh(images_whwh), z(noise), fresh(renew_noise), ac(alphas_cumprod);
  const auto keep_c = keep.contiguous();
  const auto options = x_t.options().dtype(at::kDouble);
  auto x0 = at::empty({batch, proposals, 4}, options);
  auto x_next = at::empty_like(x0);
  auto next_boxes = at::empty_like(x0);
  // The kernel writes every image's count; without proposals there is no launch and the counts are 0.
  auto num_kept =
      proposals > 0 ? at::empty({batch}, options.dtype(at::kLong)) : at::zeros({batch}, options.dtype(at::kLong));
  if (batch > 0 && proposals > 0) {
    ddim_kernel<<<static_cast<unsigned>(batch), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        xt.view(), pred.view(), whwh.view(), keep_c.data_ptr<bool>(), z.view(), fresh.view(), ac.view(), t, t_next, eta,
        scale, proposals, x0.data_ptr<double>(), x_next.data_ptr<double>(), next_boxes.data_ptr<double>(),
        num_kept.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {x_next, x0, next_boxes, num_kept};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiffinst, CUDA, m) {
  register_box_diffusion_kernels<q_sample_boxes_cuda, ddim_step_boxes_cuda>(m);
}

}  // namespace fastdiffinst
