// The type the kernels compute in for a storage type: fp32 for fp32, fp16 and bf16 storage, fp64 for
// fp64 (docs/design.md §2, dtypes). Accumulators and box coordinates both use it, on CPU and CUDA.
#pragma once

#include <ATen/OpMathType.h>

namespace fastdiffinst {

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

}  // namespace fastdiffinst
