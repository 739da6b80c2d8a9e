// File: kernels/cpu/moe/moe_kernels_amx_emulated.h
//
// Test-only kernel table: the AMX variant's tile kernels (moe_kernels_amx.cc)
// compiled with scalar emulation of the tile registers and AVX-512 for the
// rest, so that the tile code runs on AVX-512 CPUs without AMX. Its `variant`
// field says kAvx512 (what the host must support). Library ktx_moe_amx_emulated.
// Thread-safe: the emulated tiles are thread_local.
#pragma once

#include "kernels/cpu/moe/moe_internal.h"

namespace ktx::kernels::moe {

const MoeKernels& MoeKernelsAmxEmulated();

}  // namespace ktx::kernels::moe
