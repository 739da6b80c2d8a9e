// Temporary: delegates to the scalar kernels.
#include "kernels/cpu/moe/moe_internal.h"

namespace ktx::kernels::moe {
namespace {
bool Supports(MoeMatrixFormat f) { return MoeFormatSupported(f); }
int64_t NoScratch(MoeMatrixFormat, int64_t) { return 0; }
}  // namespace

const MoeKernels& MoeKernelsAvx2() {
  static const MoeKernels k = {CpuVariant::kAvx2, "avx2",     &Supports,       &scalar::Quantize,
                               &scalar::Matmul,   &NoScratch, &scalar::SiluMul};
  return k;
}

}  // namespace ktx::kernels::moe
