// XLA FFI handlers of the combine op (target `jax_moe_combine`).
//
//   out[n, :] = bf16( sum_{j < top_k, in order} (r >= 0 ? y[r, :] : 0) ),
//   r = slot_row[n * top_k + j]   (rows r >= m_pad count as -1)
//
// Operands:
//   y         bfloat16 (m_pad, hidden)        GEMM2 rows; hidden % 8 == 0, 16-byte aligned
//   slot_row  int32    (num_tokens * top_k,)  row of each slot in y, -1 if not local
//   out_init  bfloat16 (num_tokens, hidden)   optional; aliased to `out` and overwritten
// Result:
//   out       bfloat16 (num_tokens, hidden)   16-byte aligned
// Attributes:
//   top_k     int32  experts per token, >= 1
//   variant   int32  index into jax_moe_combine_variants
#include <optional>
#include <string>

#include "jax_moe_ffi.h"

#if defined(JAX_MOE_HAS_COMBINE)

namespace jax_moe {
namespace {

constexpr std::string_view kOp = "jax_moe_combine";
constexpr int64_t kVector = 8;        // columns per thread (compile-time divisibility)
constexpr uintptr_t kAlignment = 16;  // assumed_align of y and out

ffi::Error CombineInstantiate(ffi::Dictionary attrs) {
  return InstantiateVariant(kOp, attrs, jax_moe_combine_variants,
                            JAX_MOE_COMBINE_NUM_VARIANTS);
}

// Every check of the execute handler; `*empty` is set when there is nothing to
// launch (no tokens or hidden == 0).
ffi::Error CheckCombine(const ffi::AnyBuffer& y, const ffi::AnyBuffer& slot_row,
                        const std::optional<ffi::AnyBuffer>& out_init,
                        const ffi::AnyBuffer& out, int32_t top_k, int32_t variant,
                        bool* empty) {
  JAX_MOE_RETURN_IF_ERROR(
      CheckVariant(kOp, variant, JAX_MOE_COMBINE_NUM_VARIANTS));
  JAX_MOE_RETURN_IF_ERROR(CheckBuffer(kOp, "y", y, ffi::DataType::BF16, 2));
  JAX_MOE_RETURN_IF_ERROR(
      CheckBuffer(kOp, "slot_row", slot_row, ffi::DataType::S32, 1));
  JAX_MOE_RETURN_IF_ERROR(CheckBuffer(kOp, "out", out, ffi::DataType::BF16, 2));
  if (top_k < 1) {
    return Invalid(kOp, "top_k = " + std::to_string(top_k) + "; expected >= 1");
  }
  const int64_t hidden = y.dimensions()[1];
  const int64_t num_tokens = out.dimensions()[0];
  const int64_t num_slots = slot_row.dimensions()[0];
  if (out.dimensions()[1] != hidden) {
    return Invalid(kOp, "out has shape " + ShapeString(out.dimensions()) +
                            " but y has hidden = " + std::to_string(hidden));
  }
  if (out_init.has_value()) {
    JAX_MOE_RETURN_IF_ERROR(
        CheckBuffer(kOp, "out_init", *out_init, ffi::DataType::BF16, 2));
    if (out_init->dimensions()[0] != num_tokens ||
        out_init->dimensions()[1] != hidden) {
      return Invalid(kOp, "out_init has shape " +
                              ShapeString(out_init->dimensions()) +
                              "; expected the shape of out " +
                              ShapeString(out.dimensions()));
    }
  }
  if (num_slots != num_tokens * top_k) {
    return Invalid(kOp, "slot_row has " + std::to_string(num_slots) +
                            " entries; expected num_tokens * top_k = " +
                            std::to_string(num_tokens) + " * " +
                            std::to_string(top_k));
  }
  if (hidden % kVector != 0) {
    return Invalid(kOp, "hidden = " + std::to_string(hidden) +
                            " must be a multiple of " + std::to_string(kVector));
  }
  JAX_MOE_RETURN_IF_ERROR(CheckDimsInt32(kOp, "y", y));
  JAX_MOE_RETURN_IF_ERROR(CheckDimsInt32(kOp, "slot_row", slot_row));
  JAX_MOE_RETURN_IF_ERROR(CheckDimsInt32(kOp, "out", out));
  *empty = num_tokens == 0 || hidden == 0;
  if (*empty) return ffi::Error::Success();
  if (y.dimensions()[0] > 0) {
    JAX_MOE_RETURN_IF_ERROR(
        CheckAligned(kOp, "y", y.untyped_data(), kAlignment));
  }
  return CheckAligned(kOp, "out", out.untyped_data(), kAlignment);
}

ffi::Error CombineExecute(cudaStream_t stream, ffi::AnyBuffer y,
                          ffi::AnyBuffer slot_row,
                          std::optional<ffi::AnyBuffer> out_init,
                          ffi::Result<ffi::AnyBuffer> out, int32_t top_k,
                          int32_t variant) {
  bool empty = false;
  JAX_MOE_RETURN_IF_ERROR(
      CheckCombine(y, slot_row, out_init, *out, top_k, variant, &empty));
  if (empty) return ffi::Error::Success();
  const jax_moe_combine_variant_t& kernel = jax_moe_combine_variants[variant];
  // Normally a no-op: the instantiate stage already loaded the module.
  JAX_MOE_RETURN_IF_ERROR(LoadVariant(kOp, kernel));

  jax_moe_combine_y_t y_arg{};
  jax_moe_combine_slot_row_t slot_row_arg{};
  jax_moe_combine_out_t out_arg{};
  FillDescriptor<2>(y_arg, y);
  FillDescriptor<1>(slot_row_arg, slot_row);
  FillDescriptor<2>(out_arg, *out);
  const int32_t status =
      kernel.launch(&y_arg, &slot_row_arg, &out_arg, top_k, stream);
  return CheckLaunch(kOp, kernel.name, status);
}

// CPU target with the execute handler's checks and no launch (the output is
// left unwritten), so the argument checks can be tested without a GPU.
ffi::Error CombineCheck(ffi::AnyBuffer y, ffi::AnyBuffer slot_row,
                        std::optional<ffi::AnyBuffer> out_init,
                        ffi::Result<ffi::AnyBuffer> out, int32_t top_k,
                        int32_t variant) {
  bool empty = false;
  return CheckCombine(y, slot_row, out_init, *out, top_k, variant, &empty);
}

}  // namespace
}  // namespace jax_moe

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMoeCombineInstantiate,
                              jax_moe::CombineInstantiate,
                              xla::ffi::Ffi::BindInstantiate().Attrs());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxMoeCombineExecute, jax_moe::CombineExecute,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Arg<xla::ffi::AnyBuffer>()          // y: bfloat16 (m_pad, hidden)
        .Arg<xla::ffi::AnyBuffer>()          // slot_row: int32 (num_tokens * top_k,)
        .OptionalArg<xla::ffi::AnyBuffer>()  // out_init: bfloat16 (num_tokens, hidden)
        .Ret<xla::ffi::AnyBuffer>()          // out: bfloat16 (num_tokens, hidden)
        .Attr<int32_t>("top_k")              // experts per token
        .Attr<int32_t>("variant"),           // index into jax_moe_combine_variants
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxMoeCombineCheck, jax_moe::CombineCheck,
    xla::ffi::Ffi::Bind()
        .Arg<xla::ffi::AnyBuffer>()          // y: bfloat16 (m_pad, hidden)
        .Arg<xla::ffi::AnyBuffer>()          // slot_row: int32 (num_tokens * top_k,)
        .OptionalArg<xla::ffi::AnyBuffer>()  // out_init: bfloat16 (num_tokens, hidden)
        .Ret<xla::ffi::AnyBuffer>()          // out: bfloat16 (num_tokens, hidden), unwritten
        .Attr<int32_t>("top_k")
        .Attr<int32_t>("variant"));

#endif  // JAX_MOE_HAS_COMBINE
