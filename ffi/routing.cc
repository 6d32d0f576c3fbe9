// XLA FFI handlers of the routing-metadata op (target `jax_moe_routing`):
// jax_moe.routing_metadata's three arrays in one kernel launch (one-block tactics) or
// three (multi-block tactics).
//
// Operands:
//   topk_ids      int32 (num_slots,)   global expert id of each slot (token-major)
// Results:
//   sorted_slots  int32 (m_pad,)       m_pad = round_up(num_slots + min(L, num_slots)
//                                      * (block_m - 1), block_m)
//   tile_expert   int32 (m_pad / block_m,)
//   slot_row      int32 (num_slots,)
// Attributes:
//   num_local_experts    int32  L, in [1, the variant's max_local_experts]
//   block_m              int32  row tile, >= 1
//   local_expert_offset  int32  global id of the first local expert, >= 0
//   variant              int32  index into jax_moe_routing_variants
#include <limits>
#include <string>

#include "jax_moe_ffi.h"

#if defined(JAX_MOE_HAS_ROUTING)

namespace jax_moe {
namespace {

constexpr std::string_view kOp = "jax_moe_routing";

ffi::Error RoutingInstantiate(ffi::Dictionary attrs) {
  return InstantiateVariant(kOp, attrs, jax_moe_routing_variants,
                            JAX_MOE_ROUTING_NUM_VARIANTS);
}

ffi::Error CheckRouting(const ffi::AnyBuffer& topk_ids, const ffi::AnyBuffer& sorted_slots,
                        const ffi::AnyBuffer& tile_expert, const ffi::AnyBuffer& slot_row,
                        int32_t num_local, int32_t block_m, int32_t offset,
                        int32_t variant) {
  JAX_MOE_RETURN_IF_ERROR(CheckVariant(kOp, variant, JAX_MOE_ROUTING_NUM_VARIANTS));
  JAX_MOE_RETURN_IF_ERROR(CheckBuffer(kOp, "topk_ids", topk_ids, ffi::DataType::S32, 1));
  JAX_MOE_RETURN_IF_ERROR(
      CheckBuffer(kOp, "sorted_slots", sorted_slots, ffi::DataType::S32, 1));
  JAX_MOE_RETURN_IF_ERROR(
      CheckBuffer(kOp, "tile_expert", tile_expert, ffi::DataType::S32, 1));
  JAX_MOE_RETURN_IF_ERROR(CheckBuffer(kOp, "slot_row", slot_row, ffi::DataType::S32, 1));
  const std::optional<int64_t> max_local =
      VariantParam(jax_moe_routing_variants[variant], "max_local_experts");
  if (!max_local.has_value()) {
    return Invalid(kOp, "variant has no max_local_experts parameter");
  }
  if (num_local < 1 || num_local > *max_local) {
    return Invalid(kOp, "num_local_experts = " + std::to_string(num_local) +
                            "; expected [1, " + std::to_string(*max_local) + "]");
  }
  if (block_m < 1) {
    return Invalid(kOp, "block_m = " + std::to_string(block_m) + "; expected >= 1");
  }
  if (offset < 0) {
    return Invalid(kOp, "local_expert_offset = " + std::to_string(offset) +
                            "; expected >= 0");
  }
  const int64_t num_slots = topk_ids.dimensions()[0];
  const int64_t rows = num_slots + std::min<int64_t>(num_local, num_slots) * (block_m - 1);
  const int64_t m_pad = (rows + block_m - 1) / block_m * block_m;
  if (sorted_slots.dimensions()[0] != m_pad) {
    return Invalid(kOp, "sorted_slots has " + std::to_string(sorted_slots.dimensions()[0]) +
                            " rows; expected m_pad = " + std::to_string(m_pad) + " for " +
                            std::to_string(num_slots) + " slots, " +
                            std::to_string(num_local) + " local experts and block_m = " +
                            std::to_string(block_m));
  }
  if (tile_expert.dimensions()[0] != m_pad / block_m) {
    return Invalid(kOp, "tile_expert has " + std::to_string(tile_expert.dimensions()[0]) +
                            " tiles; expected m_pad / block_m = " +
                            std::to_string(m_pad / block_m));
  }
  if (slot_row.dimensions()[0] != num_slots) {
    return Invalid(kOp, "slot_row has " + std::to_string(slot_row.dimensions()[0]) +
                            " entries; expected num_slots = " + std::to_string(num_slots));
  }
  if (static_cast<int64_t>(offset) + num_local > std::numeric_limits<int32_t>::max()) {
    return Invalid(kOp, "local_expert_offset + num_local_experts exceeds int32");
  }
  // The kernels' slot and row arithmetic (ranges rounded up to warps * 32 slots,
  // loops strided by up to blocks * threads = 32 * 1024) stays below 2^31 with this
  // margin.
  constexpr int64_t kMargin = 65536;
  if (m_pad > std::numeric_limits<int32_t>::max() - kMargin) {
    return Invalid(kOp, "m_pad = " + std::to_string(m_pad) + " must be below 2^31 - " +
                            std::to_string(kMargin));
  }
  return ffi::Error::Success();
}

ffi::Error RoutingExecute(cudaStream_t stream, ffi::AnyBuffer topk_ids,
                          ffi::Result<ffi::AnyBuffer> sorted_slots,
                          ffi::Result<ffi::AnyBuffer> tile_expert,
                          ffi::Result<ffi::AnyBuffer> slot_row, int32_t num_local,
                          int32_t block_m, int32_t offset, int32_t variant) {
  JAX_MOE_RETURN_IF_ERROR(CheckRouting(topk_ids, *sorted_slots, *tile_expert, *slot_row,
                                       num_local, block_m, offset, variant));
  if (topk_ids.dimensions()[0] == 0) return ffi::Error::Success();  // every output empty
  const jax_moe_routing_variant_t& kernel = jax_moe_routing_variants[variant];
  JAX_MOE_RETURN_IF_ERROR(LoadVariant(kOp, kernel));
  jax_moe_routing_topk_ids_t ids_arg{};
  jax_moe_routing_sorted_slots_t sorted_arg{};
  jax_moe_routing_tile_expert_t tiles_arg{};
  jax_moe_routing_slot_row_t rows_arg{};
  FillDescriptor<1>(ids_arg, topk_ids);
  FillDescriptor<1>(sorted_arg, *sorted_slots);
  FillDescriptor<1>(tiles_arg, *tile_expert);
  FillDescriptor<1>(rows_arg, *slot_row);
  const int32_t status = kernel.launch(&ids_arg, &sorted_arg, &tiles_arg, &rows_arg,
                                       num_local, block_m, offset, stream);
  return CheckLaunch(kOp, kernel.name, status);
}

// CPU target with the execute handler's checks and no launch (outputs unwritten).
ffi::Error RoutingCheck(ffi::AnyBuffer topk_ids, ffi::Result<ffi::AnyBuffer> sorted_slots,
                        ffi::Result<ffi::AnyBuffer> tile_expert,
                        ffi::Result<ffi::AnyBuffer> slot_row, int32_t num_local,
                        int32_t block_m, int32_t offset, int32_t variant) {
  return CheckRouting(topk_ids, *sorted_slots, *tile_expert, *slot_row, num_local, block_m,
                      offset, variant);
}

}  // namespace
}  // namespace jax_moe

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMoeRoutingInstantiate, jax_moe::RoutingInstantiate,
                              xla::ffi::Ffi::BindInstantiate().Attrs());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxMoeRoutingExecute, jax_moe::RoutingExecute,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Arg<xla::ffi::AnyBuffer>()  // topk_ids: int32 (num_slots,)
        .Ret<xla::ffi::AnyBuffer>()  // sorted_slots: int32 (m_pad,)
        .Ret<xla::ffi::AnyBuffer>()  // tile_expert: int32 (m_pad / block_m,)
        .Ret<xla::ffi::AnyBuffer>()  // slot_row: int32 (num_slots,)
        .Attr<int32_t>("num_local_experts")
        .Attr<int32_t>("block_m")
        .Attr<int32_t>("local_expert_offset")
        .Attr<int32_t>("variant"),
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxMoeRoutingCheck, jax_moe::RoutingCheck,
    xla::ffi::Ffi::Bind()
        .Arg<xla::ffi::AnyBuffer>()
        .Ret<xla::ffi::AnyBuffer>()
        .Ret<xla::ffi::AnyBuffer>()
        .Ret<xla::ffi::AnyBuffer>()
        .Attr<int32_t>("num_local_experts")
        .Attr<int32_t>("block_m")
        .Attr<int32_t>("local_expert_offset")
        .Attr<int32_t>("variant"));

#endif  // JAX_MOE_HAS_ROUTING
