// Channels-last views of CPU feature maps for the kernels that read one contiguous channel vector
// per pixel.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fastdiffinst {

// `input` [B, C, H, W] with channels-last storage: `input` itself when it already is, otherwise a
// copy in a workspace of the calling thread that is reused across calls (`slot` tells apart the
// tensors one call needs at once, e.g. the pyramid levels). Reuse matters: on a fresh buffer the
// first-touch page faults cost more than the transposition itself (measured on an 83 MB pyramid:
// 57 ms into a new buffer, 24 ms into a reused one). The workspace holds the largest pyramid seen
// by the thread; the view is valid until the thread's next call with the same slot.
inline at::Tensor channels_last_view(const at::Tensor& input, size_t slot) {
  if (input.is_contiguous(at::MemoryFormat::ChannelsLast)) return input;
  thread_local std::vector<at::Tensor> workspaces;
  if (workspaces.size() <= slot) workspaces.resize(slot + 1);
  auto& workspace = workspaces[slot];
  const int64_t bytes = input.numel() * static_cast<int64_t>(input.element_size());
  if (!workspace.defined() || workspace.numel() < bytes)
    workspace = at::empty({bytes}, input.options().dtype(at::kByte));
  const auto sizes = input.sizes();
  const std::vector<int64_t> strides = {sizes[1] * sizes[2] * sizes[3], 1, sizes[3] * sizes[1], sizes[1]};
  auto view = at::from_blob(workspace.data_ptr(), sizes, strides, input.options());
  view.copy_(input);
  return view;
}

}  // namespace fastdiffinst
