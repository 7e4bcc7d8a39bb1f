// CUDA kernels of q_sample_boxes and ddim_step_boxes: fixed shapes, no host synchronisation.
// Arithmetic in float64, shared with the CPU kernels (ops/common/box_diffusion_math.h).
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

__device__ inline void copy4(const double* src, double* dst) {
  for (int j = 0; j < 4; ++j) dst[j] = src[j];
}

__global__ void q_sample_kernel(const double* __restrict__ gt, const int64_t* __restrict__ counts,
                                const int64_t* __restrict__ steps, const double* __restrict__ eps,
                                const double* __restrict__ draws, const int64_t* __restrict__ select,
                                const double* __restrict__ sa, const double* __restrict__ s1a,
                                const double* __restrict__ whwh, int64_t batch, int64_t max_gt, int64_t proposals,
                                int64_t timesteps, double scale, double* __restrict__ out) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= batch * proposals) return;
  const int64_t b = k / proposals;
  const int64_t count = clamp_index(counts[b], 0, max_gt);
  const int64_t step = clamp_index(steps[b], 0, timesteps - 1);
  double x0[4];
  diffusion::start_box(
      select[k], count, [&](double* draw) { copy4(draws + 4 * k, draw); },
      [&](int64_t sel, double* box) { copy4(gt + (b * max_gt + clamp_index(sel, 0, count - 1)) * 4, box); }, x0);
  diffusion::q_sample_box(x0, eps + 4 * k, sa[step], s1a[step], scale, whwh + 4 * b, out + 4 * k);
}

// One block per image. Kept proposals are compacted to the front in order with a block-wide
// exclusive scan over chunks of kThreads proposals.
__global__ void ddim_kernel(const double* __restrict__ x_t, const double* __restrict__ pred,
                            const double* __restrict__ whwh, const bool* __restrict__ keep,
                            const double* __restrict__ z, const double* __restrict__ fresh,
                            const double* __restrict__ alphas_cumprod, int64_t t, int64_t t_next, double eta,
                            double scale, int64_t proposals, double* __restrict__ x0, double* __restrict__ x_next,
                            double* __restrict__ next_boxes, int64_t* __restrict__ num_kept) {
  __shared__ int64_t scan[kThreads];
  const int64_t b = blockIdx.x;
  const int64_t base = b * proposals;
  const double* image_whwh = whwh + 4 * b;
  const double inv_whwh[4] = {1.0 / image_whwh[0], 1.0 / image_whwh[1], 1.0 / image_whwh[2], 1.0 / image_whwh[3]};
  const double alpha_next = t_next >= 0 ? alphas_cumprod[t_next] : 1.0;
  const auto k = diffusion::ddim_coefficients(alphas_cumprod[t], alpha_next, eta);
  int64_t carry = 0;
  for (int64_t chunk = 0; chunk < proposals; chunk += kThreads) {
    const int64_t i = chunk + threadIdx.x;
    const bool kept = i < proposals && keep[base + i];
    if (i < proposals) diffusion::box_to_signal(pred + 4 * (base + i), inv_whwh, scale, x0 + 4 * (base + i));
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
        diffusion::ddim_update(x_t + 4 * (base + i), x0 + 4 * (base + i), z + 4 * (base + slot), k,
                               x_next + 4 * (base + slot));
      }
    }
    carry += scan[kThreads - 1];
    __syncthreads();
  }
  if (threadIdx.x == 0) num_kept[b] = carry;
  for (int64_t p = threadIdx.x; p < proposals; p += kThreads) {
    if (t_next >= 0 && p >= carry)
      for (int j = 0; j < 4; ++j) x_next[4 * (base + p) + j] = fresh[4 * (base + p) + j];
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
  const auto gt = f64(gt_boxes), eps = f64(noise), draws = f64(placeholder_noise), whwh = f64(images_whwh);
  const auto sa = f64(sqrt_alphas_cumprod), s1a = f64(sqrt_one_minus_alphas_cumprod);
  const auto counts = gt_counts.contiguous(), steps = t.contiguous(), select = select_index.contiguous();
  auto out = at::empty({s.batch, s.proposals, 4}, gt.options());
  const int64_t n = s.batch * s.proposals;
  if (n == 0) return out;
  q_sample_kernel<<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0,
                    c10::cuda::getCurrentCUDAStream()>>>(
      gt.data_ptr<double>(), counts.data_ptr<int64_t>(), steps.data_ptr<int64_t>(), eps.data_ptr<double>(),
      draws.data_ptr<double>(), select.data_ptr<int64_t>(), sa.data_ptr<double>(), s1a.data_ptr<double>(),
      whwh.data_ptr<double>(), s.batch, s.max_gt, s.proposals, s.timesteps, scale, out.data_ptr<double>());
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
  const auto xt = f64(x_t), pred = f64(pred_boxes), whwh = f64(images_whwh), z = f64(noise), fresh = f64(renew_noise);
  const auto ac = f64(alphas_cumprod);
  const auto keep_c = keep.contiguous();
  auto x0 = at::empty({batch, proposals, 4}, xt.options());
  auto x_next = at::empty_like(x0);
  auto next_boxes = at::empty_like(x0);
  auto num_kept = at::zeros({batch}, keep.options().dtype(at::kLong));
  if (batch > 0 && proposals > 0) {
    ddim_kernel<<<static_cast<unsigned>(batch), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        xt.data_ptr<double>(), pred.data_ptr<double>(), whwh.data_ptr<double>(), keep_c.data_ptr<bool>(),
        z.data_ptr<double>(), fresh.data_ptr<double>(), ac.data_ptr<double>(), t, t_next, eta, scale, proposals,
        x0.data_ptr<double>(), x_next.data_ptr<double>(), next_boxes.data_ptr<double>(), num_kept.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {x_next, x0, next_boxes, num_kept};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiffinst, CUDA, m) {
  register_box_diffusion_kernels<q_sample_boxes_cuda, ddim_step_boxes_cuda>(m);
}

}  // namespace fastdiffinst
