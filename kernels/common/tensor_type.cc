#include "kernels/common/tensor_type.h"

#include <strings.h>
#include <array>
#include <cstdio>
#include <cstdlib>

namespace ktx::kernels {
namespace {

constexpr std::array<TensorTypeTraits, 31> kTraits = {{
    {TensorType::kF32, "f32", 1, 4, true},
    {TensorType::kF16, "f16", 1, 2, true},
    {TensorType::kQ4_0, "q4_0", 32, 18, true},
    {TensorType::kQ4_1, "q4_1", 32, 20, false},
    {TensorType::kQ5_0, "q5_0", 32, 22, true},
    {TensorType::kQ5_1, "q5_1", 32, 24, false},
    {TensorType::kQ8_0, "q8_0", 32, 34, true},
    {TensorType::kQ8_1, "q8_1", 32, 36, false},
    {TensorType::kQ2_K, "q2_K", 256, 84, false},
    {TensorType::kQ3_K, "q3_K", 256, 110, false},
    {TensorType::kQ4_K, "q4_K", 256, 144, true},
    {TensorType::kQ5_K, "q5_K", 256, 176, true},
    {TensorType::kQ6_K, "q6_K", 256, 210, true},
    {TensorType::kQ8_K, "q8_K", 256, 292, false},
    {TensorType::kIQ2_XXS, "iq2_xxs", 256, 66, false},
    {TensorType::kIQ2_XS, "iq2_xs", 256, 74, false},
    {TensorType::kIQ3_XXS, "iq3_xxs", 256, 98, false},
    {TensorType::kIQ1_S, "iq1_s", 256, 50, false},
    {TensorType::kIQ4_NL, "iq4_nl", 32, 18, false},
    {TensorType::kIQ3_S, "iq3_s", 256, 110, false},
    {TensorType::kIQ2_S, "iq2_s", 256, 82, false},
    {TensorType::kIQ4_XS, "iq4_xs", 256, 136, true},
    {TensorType::kI8, "i8", 1, 1, false},
    {TensorType::kI16, "i16", 1, 2, false},
    {TensorType::kI32, "i32", 1, 4, false},
    {TensorType::kI64, "i64", 1, 8, false},
    {TensorType::kF64, "f64", 1, 8, false},
    {TensorType::kIQ1_M, "iq1_m", 256, 56, false},
    {TensorType::kBF16, "bf16", 1, 2, true},
    {TensorType::kTQ1_0, "tq1_0", 256, 54, false},
    {TensorType::kTQ2_0, "tq2_0", 256, 66, false},
}};

}  // namespace

std::optional<TensorTypeTraits> GetTensorTypeTraits(uint32_t type_id) {
  for (const TensorTypeTraits& t : kTraits) {
    if (static_cast<uint32_t>(t.type) == type_id) return t;
  }
  if (type_id == static_cast<uint32_t>(TensorType::kMXFP4)) {
    return TensorTypeTraits{TensorType::kMXFP4, "mxfp4", 32, 17, false};
  }
  return std::nullopt;
}

const TensorTypeTraits& TraitsOf(TensorType type) {
  for (const TensorTypeTraits& t : kTraits) {
    if (t.type == type) return t;
  }
  static const TensorTypeTraits kMxfp4{TensorType::kMXFP4, "mxfp4", 32, 17, false};
  if (type == TensorType::kMXFP4) return kMxfp4;
  std::fprintf(stderr, "ktx: TraitsOf: unknown tensor type %u\n", static_cast<unsigned>(type));
  std::abort();
}

std::string SupportedTensorTypeNames() {
  std::string out;
  for (const TensorTypeTraits& t : kTraits) {
    if (!t.supported) continue;
    if (!out.empty()) out += ", ";
    out += t.name;
  }
  return out;
}

std::optional<TensorType> TensorTypeFromName(std::string_view name) {
  for (const TensorTypeTraits& t : kTraits) {
    const std::string_view n(t.name);
    if (n.size() == name.size() && strncasecmp(n.data(), name.data(), n.size()) == 0) return t.type;
  }
  return std::nullopt;
}

}  // namespace ktx::kernels
