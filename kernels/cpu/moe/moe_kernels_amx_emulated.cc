// The AMX variant's tile code with scalar tile emulation (tests only):
// defines MoeKernelsAmxEmulated() (moe_kernels_amx_emulated.h).
#define KTX_MOE_AMX_EMULATE 1
#include "kernels/cpu/moe/moe_kernels_amx.cc"  // NOLINT(bugprone-suspicious-include)
