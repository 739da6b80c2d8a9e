// File: kernels/cpu/moe/moe_kernels_avx512.h
//
// The AVX-512 kernels, also used by the AMX variant for what is not a tile
// kernel (decode on panel16, quantizers, SiLU). Defined in moe_kernels_avx512.cc
// (compiled with AVX-512 flags): call only after checking the CPU.
// Thread-safe: pure functions.
#pragma once

#include <cstdint>

#include "kernels/cpu/moe/moe_internal.h"

namespace ktx::kernels::moe::avx512 {

void Quantize(ActFormat fmt, const float* x, uint8_t* dst, int64_t k);
void SiluMul(const float* g, const float* u, float* h, int64_t n);
// The tile-format quantizer (bitwise equal to scalar::QuantizeTile).
void QuantizeTile(const float* x, int8_t* q, float* d, int64_t n, int64_t group);
// Runs `a` when it is a panel16 matrix and returns true; false otherwise.
bool MatmulPanel(const MatmulArgs& a);
// Panel16 kernels, else the scalar code.
void Matmul(const MatmulArgs& a);

}  // namespace ktx::kernels::moe::avx512
