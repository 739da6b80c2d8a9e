// File: runtime/base/status.h
//
// ktx's error vocabulary for host code: absl::Status / absl::StatusOr<T>.
// Abseil 20220623 (Debian 12) has no status macros, so ktx defines its own:
//
//   absl::StatusOr<Model> Load(const std::string& path) {
//     KTX_ASSIGN_OR_RETURN(GgufFile file, GgufFile::Open(path));
//     KTX_RETURN_IF_ERROR(Validate(file));
//     ...
//   }
//
// Programmer invariants (never user input) use KTX_CHECK, which aborts with the
// failed condition, file and line. Everything a user can cause is a Status.
// Conversion to caf::error and grpc::Status happens in exactly one place:
// actors/status_bridge.h.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define KTX_STATUS_CONCAT_INNER_(a, b) a##b
#define KTX_STATUS_CONCAT_(a, b) KTX_STATUS_CONCAT_INNER_(a, b)

// Returns the status from the enclosing function when `expr` is not OK.
#define KTX_RETURN_IF_ERROR(expr)                      \
  do {                                                 \
    ::absl::Status ktx_status_tmp_ = (expr);           \
    if (!ktx_status_tmp_.ok()) return ktx_status_tmp_; \
  } while (false)

// Evaluates `rexpr` (a StatusOr<T>); on error returns its status, else moves the
// value into `lhs` (which may be a declaration: `KTX_ASSIGN_OR_RETURN(auto x, F())`).
#define KTX_ASSIGN_OR_RETURN(lhs, rexpr) \
  KTX_ASSIGN_OR_RETURN_IMPL_(KTX_STATUS_CONCAT_(ktx_statusor_, __LINE__), lhs, rexpr)

#define KTX_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                               \
  if (!tmp.ok()) return std::move(tmp).status();    \
  lhs = std::move(tmp).value()

namespace ktx::internal {
[[noreturn]] void CheckFailed(const char* condition, const char* file, int line,
                              const char* message);
}  // namespace ktx::internal

// Aborts when a programmer invariant does not hold. Never for user input.
#define KTX_CHECK(cond)                                                       \
  do {                                                                        \
    if (!(cond)) ::ktx::internal::CheckFailed(#cond, __FILE__, __LINE__, ""); \
  } while (false)

#define KTX_CHECK_MSG(cond, msg)                                                 \
  do {                                                                           \
    if (!(cond)) ::ktx::internal::CheckFailed(#cond, __FILE__, __LINE__, (msg)); \
  } while (false)
