// Channels-last scratch buffers for the CPU kernels that read or accumulate one contiguous channel
// vector per pixel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace fastdiffinst {

// An uninitialised [B, C, H, W] tensor with channels-last strides in a workspace of the calling
// thread that is reused across calls (`slot` tells apart the buffers one call needs at once, e.g.
// the pyramid levels). Reuse matters: on a fresh buffer the first-touch page faults cost more than
// the work (measured on an 83 MB pyramid: a transposition takes 57 ms into a new buffer and 24 ms
// into a reused one). The workspace keeps the largest buffer the thread has needed per slot; the
// view is valid until the thread's next call with the same slot.
inline at::Tensor channels_last_workspace(size_t slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  thread_local std::vector<at::Tensor> workspaces;
  if (workspaces.size() <= slot) workspaces.resize(slot + 1);
  auto& workspace = workspaces[slot];
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (!workspace.defined() || workspace.numel() < bytes) workspace = at::empty({bytes}, options.dtype(at::kByte));
  const std::vector<int64_t> strides = {sizes[1] * sizes[2] * sizes[3], 1, sizes[3] * sizes[1], sizes[1]};
  return at::from_blob(workspace.data_ptr(), sizes, strides, options);
}

// `input` [B, C, H, W] with channels-last storage: `input` itself when it already is, otherwise a
// copy in the reused workspace `slot`.
inline at::Tensor channels_last_view(const at::Tensor& input, size_t slot) {
  if (input.is_contiguous(at::MemoryFormat::ChannelsLast)) return input;
  auto view = channels_last_workspace(slot, input.sizes(), input.options());
  view.copy_(input);
  return view;
}

// A contiguous (NCHW) copy of the channels-last [B, C, H, W] `src`, converted to `dtype`.
// Tiled so that both the reads (pixel-major) and the writes (channel-major) stay within a few
// cache lines per tile; torch's generic strided copy takes 3x longer in this direction.
inline at::Tensor channels_last_to_contiguous(const at::Tensor& src, at::ScalarType dtype) {
  TORCH_INTERNAL_ASSERT(src.is_contiguous(at::MemoryFormat::ChannelsLast));
  auto dst = at::empty(src.sizes(), src.options().dtype(dtype));
  const int64_t batch = src.size(0), channels = src.size(1), pixels = src.size(2) * src.size(3);
  if (dst.numel() == 0) return dst;
  constexpr int64_t kPixels = 64, kChannels = 16;
  const int64_t pixel_blocks = (pixels + kPixels - 1) / kPixels;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "channels_last_to_contiguous", [&] {
    using src_t = scalar_t;
    const src_t* s = src.data_ptr<src_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "channels_last_to_contiguous", [&] {
      scalar_t* d = dst.data_ptr<scalar_t>();
      at::parallel_for(0, batch * pixel_blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t block = begin; block < end; ++block) {
          const int64_t b = block / pixel_blocks;
          const int64_t p0 = (block % pixel_blocks) * kPixels;
          const int64_t np = std::min(kPixels, pixels - p0);
          for (int64_t c0 = 0; c0 < channels; c0 += kChannels) {
            const int64_t nc = std::min(kChannels, channels - c0);
            for (int64_t c = c0; c < c0 + nc; ++c) {
              const src_t* in = s + (b * pixels + p0) * channels + c;
              scalar_t* out = d + (b * channels + c) * pixels + p0;
              for (int64_t p = 0; p < np; ++p) out[p] = static_cast<scalar_t>(in[p * channels]);
            }
          }
        }
      });
    });
  });
  return dst;
}

}  // namespace fastdiffinst
