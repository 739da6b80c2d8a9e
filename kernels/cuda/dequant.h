// File: kernels/cuda/dequant.h
//
// GGUF weights to bf16 on the GPU: the raw blocks of a tensor, copied to the
// device as they are stored in the file, are expanded row by row into a
// row-major bf16 matrix. One kernel per storage type; every element is
// computed with the same float operations, in the same order, as
// kernels/cpu/quant DequantizeRow and then rounded to nearest-even bf16, so
// the result equals FloatToBf16(DequantizeRow(...)) bit for bit (tested).
//
//   DequantizeToBf16(TensorType::kQ4_K, d_raw, row_bytes, n_rows, n_cols, d_out, n_cols, stream);
//
// Supported: F32, F16, BF16, Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_XS.
// Thread-safety: launchers are reentrant; they never allocate.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/common/tensor_type.h"

namespace ktx::kernels::cuda {

// True for the storage types DequantizeToBf16 accepts.
bool CanDequantizeOnGpu(TensorType type);

// dst[r * dst_stride + c] = bf16(element c of row r) for r < n_rows, c < n_cols.
// `src` (device) holds n_rows rows of `src_row_bytes` bytes each, in GGUF block
// layout; n_cols must be a multiple of the type's block size and src rows
// 2-byte aligned (4 for F32). cudaErrorInvalidValue for an unsupported type
// or a bad shape.
cudaError_t DequantizeToBf16(TensorType type, const void* src, int64_t src_row_bytes,
                             int64_t n_rows, int64_t n_cols, __nv_bfloat16* dst, int64_t dst_stride,
                             cudaStream_t stream);

}  // namespace ktx::kernels::cuda
