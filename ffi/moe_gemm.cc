// XLA FFI handlers of the grouped NVFP4 GEMMs (targets `jax_moe_moe_gemm1`,
// `jax_moe_moe_gemm2`). The routing contract (sorted_slots, tile_expert) and
// the math are documented in jax_moe/kernels/moe_gemm{1,2}_sm90.py.
//
// jax_moe_moe_gemm1: act[r] = bf16(silu(x W13_gate^T gs) * (x W13_up^T gs)), x = hidden[s / top_k]
//   Operands:
//     hidden        bfloat16 (num_tokens, hidden)               hidden % 64 == 0, 16-byte aligned
//     sorted_slots  int32    (m_pad,)                           m_pad % block_m == 0
//     tile_expert   int32    (m_pad / block_m,)
//     w13_packed    uint8    (experts, 2 * inter, hidden / 2)   prepared order, 16-byte aligned
//     w13_scale     uint8    (experts, 2 * inter, hidden / 16)  prepared scale bytes, 16-byte aligned
//     w13_global    float32  (experts,)
//   Results:
//     act           bfloat16 (m_pad, inter)                     inter % 64 == 0, 16-byte aligned
//     workspace     int32    (words,)                           stream-K variants: see below
//   Attributes: top_k int32 (>= 1), num_ctas int32, variant int32.
//
// jax_moe_moe_gemm2: y[r] = topk_weights[s] * (act[r] W2^T) * gs
//   Operands:
//     act           bfloat16 (m_pad, inter)                     inter % 64 == 0, 16-byte aligned
//     sorted_slots  int32    (m_pad,)                           m_pad % block_m == 0
//     tile_expert   int32    (m_pad / block_m,)
//     w2_packed     uint8    (experts, hidden, inter / 2)       16-byte aligned
//     w2_scale      uint8    (experts, hidden, inter / 16)      prepared scale bytes, 16-byte aligned
//     w2_global     float32  (experts,)
//     topk_weights  float32  (num_tokens * top_k,)
//   Results:
//     y             bfloat16 (m_pad, hidden)                    hidden % 128 == 0, 16-byte aligned
//     workspace     int32    (words,)                           stream-K variants: see below
//   Attributes: num_ctas int32, variant int32.
//
// Stream-K variants (tactic field stream_k > 0) launch `num_ctas` CTAs (>= 1) and
// need m_pad / block_m <= kStreamKMaxTiles and a 16-byte aligned workspace of at
// least round_up(m_pad / block_m * weight_rows / block_w, 4) + 2 * num_ctas *
// block_m * block_w words (jax_moe.kernels.moe_gemm_config.stream_k_workspace_words):
// the arrival counters, which the handler clears before the launch, then the
// partial tiles. Other variants ignore the workspace and num_ctas.
//
// Values inside sorted_slots / tile_expert are trusted (they come from
// jax_moe.routing_metadata); everything about shapes, dtypes and alignment is
// checked here.
#include <string>

#include "jax_moe_ffi.h"

#if defined(JAX_MOE_HAS_MOE_GEMM1) || defined(JAX_MOE_HAS_MOE_GEMM2)

namespace jax_moe {
namespace {

constexpr uintptr_t kVectorAlignment = 16;
constexpr uintptr_t kScalarAlignment = 4;

std::string Dims(const ffi::AnyBuffer& buffer) {
  return ShapeString(buffer.dimensions());
}

ffi::Error CheckScale(std::string_view op, std::string_view what,
                      const ffi::AnyBuffer& scale) {
  if (scale.element_type() != ffi::DataType::U8 || scale.dimensions().size() != 3) {
    return Invalid(op, std::string(what) +
                           " must be a rank-3 uint8 array of prepared scale bytes, got " +
                           std::string(DataTypeName(scale.element_type())) +
                           " of shape " + Dims(scale));
  }
  return ffi::Error::Success();
}

// Checks the weight triple (packed, scale, global) of `experts` experts whose
// matrices are (rows, cols) NVFP4.
ffi::Error CheckWeights(std::string_view op, std::string_view name,
                        const ffi::AnyBuffer& packed,
                        const ffi::AnyBuffer& scale,
                        const ffi::AnyBuffer& global, int64_t rows,
                        int64_t cols) {
  const std::string n(name);
  JAX_MOE_RETURN_IF_ERROR(
      CheckBuffer(op, n + "_packed", packed, ffi::DataType::U8, 3));
  JAX_MOE_RETURN_IF_ERROR(CheckScale(op, n + "_scale", scale));
  JAX_MOE_RETURN_IF_ERROR(
      CheckBuffer(op, n + "_global", global, ffi::DataType::F32, 1));
  const int64_t experts = packed.dimensions()[0];
  auto p = packed.dimensions();
  auto s = scale.dimensions();
  if (p[1] != rows || p[2] != cols / 2) {
    return Invalid(op, n + "_packed has shape " + Dims(packed) + "; expected (" +
                           std::to_string(experts) + ", " + std::to_string(rows) +
                           ", " + std::to_string(cols / 2) + ")");
  }
  if (s[0] != experts || s[1] != rows || s[2] != cols / 16) {
    return Invalid(op, n + "_scale has shape " + Dims(scale) + "; expected (" +
                           std::to_string(experts) + ", " + std::to_string(rows) +
                           ", " + std::to_string(cols / 16) + ")");
  }
  if (global.dimensions()[0] != experts) {
    return Invalid(op, n + "_global has shape " + Dims(global) + "; expected (" +
                           std::to_string(experts) + ",)");
  }
  JAX_MOE_RETURN_IF_ERROR(CheckDimsInt32(op, n + "_packed", packed));
  JAX_MOE_RETURN_IF_ERROR(CheckDimsInt32(op, n + "_scale", scale));
  if (experts > 0 && rows > 0 && cols > 0) {
    JAX_MOE_RETURN_IF_ERROR(
        CheckAligned(op, n + "_packed", packed.untyped_data(), kVectorAlignment));
    JAX_MOE_RETURN_IF_ERROR(
        CheckAligned(op, n + "_scale", scale.untyped_data(), kVectorAlignment));
    JAX_MOE_RETURN_IF_ERROR(
        CheckAligned(op, n + "_global", global.untyped_data(), kScalarAlignment));
  }
  return ffi::Error::Success();
}

// Checks the routing metadata against the variant's block_m.
template <typename Variant>
ffi::Error CheckRouting(std::string_view op, const Variant& kernel,
                        const ffi::AnyBuffer& sorted_slots,
                        const ffi::AnyBuffer& tile_expert) {
  JAX_MOE_RETURN_IF_ERROR(
      CheckBuffer(op, "sorted_slots", sorted_slots, ffi::DataType::S32, 1));
  JAX_MOE_RETURN_IF_ERROR(
      CheckBuffer(op, "tile_expert", tile_expert, ffi::DataType::S32, 1));
  JAX_MOE_RETURN_IF_ERROR(CheckDimsInt32(op, "sorted_slots", sorted_slots));
  std::optional<int64_t> block_m = VariantParam(kernel, "block_m");
  if (!block_m.has_value() || *block_m <= 0) {
    return ffi::Error::Internal(std::string(op) + ": variant " + kernel.name +
                                " has no block_m parameter");
  }
  const int64_t m_pad = sorted_slots.dimensions()[0];
  if (m_pad % *block_m != 0 || tile_expert.dimensions()[0] != m_pad / *block_m) {
    return Invalid(op, "sorted_slots has " + std::to_string(m_pad) +
                           " rows and tile_expert " +
                           std::to_string(tile_expert.dimensions()[0]) +
                           " tiles; variant " + kernel.name +
                           " needs m_pad % block_m == 0 and m_pad / block_m tiles, block_m = " +
                           std::to_string(*block_m));
  }
  return ffi::Error::Success();
}

// Row tiles a stream-K CTA can list (STREAM_K_MAX_TILES in
// jax_moe/kernels/moe_gemm_config.py).
constexpr int64_t kStreamKMaxTiles = 1024;

// Checks the workspace of a GEMM call and, for a stream-K variant, its size and
// num_ctas; `*counter_words` is set to the arrival counters the handler must clear
// before the launch (0 for the other variants).
template <typename Variant>
ffi::Error CheckWorkspace(std::string_view op, const Variant& kernel,
                          const ffi::AnyBuffer& workspace, int64_t row_tiles,
                          int64_t weight_rows, int32_t num_ctas,
                          int64_t* counter_words) {
  *counter_words = 0;
  JAX_MOE_RETURN_IF_ERROR(
      CheckBuffer(op, "workspace", workspace, ffi::DataType::S32, 1));
  const int64_t stream_k = VariantParam(kernel, "stream_k").value_or(0);
  if (stream_k == 0) return ffi::Error::Success();
  if (num_ctas < 1) {
    return Invalid(op, "num_ctas = " + std::to_string(num_ctas) + "; stream-K variant " +
                           kernel.name + " needs >= 1");
  }
  if (row_tiles > kStreamKMaxTiles) {
    return Invalid(op, "stream-K variant " + std::string(kernel.name) + " takes at most " +
                           std::to_string(kStreamKMaxTiles) + " row tiles; got " +
                           std::to_string(row_tiles) +
                           " (a decode tactic: use another one for this many routed rows)");
  }
  const int64_t block_m = VariantParam(kernel, "block_m").value_or(0);
  const int64_t block_w = VariantParam(kernel, "block_w").value_or(0);
  if (block_m <= 0 || block_w <= 0) {
    return ffi::Error::Internal(std::string(op) + ": variant " + kernel.name +
                                " has no block_m or block_w parameter");
  }
  const int64_t counters = (row_tiles * (weight_rows / block_w) + 3) / 4 * 4;
  const int64_t words = counters + 2 * int64_t{num_ctas} * block_m * block_w;
  if (static_cast<int64_t>(workspace.element_count()) < words) {
    return Invalid(op, "workspace has " + std::to_string(workspace.element_count()) +
                           " words; stream-K variant " + kernel.name + " needs " +
                           std::to_string(words) + " for num_ctas = " +
                           std::to_string(num_ctas));
  }
  JAX_MOE_RETURN_IF_ERROR(CheckDimsInt32(op, "workspace", workspace));
  JAX_MOE_RETURN_IF_ERROR(
      CheckAligned(op, "workspace", workspace.untyped_data(), kVectorAlignment));
  *counter_words = counters;
  return ffi::Error::Success();
}

// Clears a stream-K launch's arrival counters on `stream` (nothing for 0 words).
ffi::Error ClearCounters(std::string_view op, ffi::AnyBuffer& workspace,
                         int64_t counter_words, cudaStream_t stream) {
  if (counter_words == 0) return ffi::Error::Success();
  return CudaStatus(op, "clearing the stream-K counters",
                    cudaMemsetAsync(workspace.untyped_data(), 0,
                                    static_cast<size_t>(counter_words) * sizeof(int32_t),
                                    stream));
}

ffi::Error CheckMultiple(std::string_view op, std::string_view what,
                         int64_t value, int64_t multiple) {
  if (value % multiple != 0) {
    return Invalid(op, std::string(what) + " = " + std::to_string(value) +
                           " must be a multiple of " + std::to_string(multiple));
  }
  return ffi::Error::Success();
}

#if defined(JAX_MOE_HAS_MOE_GEMM1)
constexpr std::string_view kGemm1 = "jax_moe_moe_gemm1";

ffi::Error MoeGemm1Instantiate(ffi::Dictionary attrs) {
  return InstantiateVariant(kGemm1, attrs, jax_moe_moe_gemm1_variants,
                            JAX_MOE_MOE_GEMM1_NUM_VARIANTS);
}

// Every check of the GEMM1 execute handler; `*empty` is set when there is nothing
// to launch, `*counter_words` to the stream-K counters to clear.
ffi::Error CheckGemm1(const ffi::AnyBuffer& hidden, const ffi::AnyBuffer& sorted_slots,
                      const ffi::AnyBuffer& tile_expert, const ffi::AnyBuffer& w13_packed,
                      const ffi::AnyBuffer& w13_scale, const ffi::AnyBuffer& w13_global,
                      const ffi::AnyBuffer& act, const ffi::AnyBuffer& workspace,
                      int32_t top_k, int32_t num_ctas, int32_t variant,
                      int64_t* counter_words, bool* empty) {
  *empty = true;
  *counter_words = 0;
  JAX_MOE_RETURN_IF_ERROR(
      CheckVariant(kGemm1, variant, JAX_MOE_MOE_GEMM1_NUM_VARIANTS));
  const jax_moe_moe_gemm1_variant_t& kernel = jax_moe_moe_gemm1_variants[variant];
  JAX_MOE_RETURN_IF_ERROR(
      CheckBuffer(kGemm1, "hidden", hidden, ffi::DataType::BF16, 2));
  JAX_MOE_RETURN_IF_ERROR(CheckBuffer(kGemm1, "act", act, ffi::DataType::BF16, 2));
  JAX_MOE_RETURN_IF_ERROR(CheckRouting(kGemm1, kernel, sorted_slots, tile_expert));
  if (top_k < 1) {
    return Invalid(kGemm1, "top_k = " + std::to_string(top_k) + "; expected >= 1");
  }
  const int64_t h = hidden.dimensions()[1];
  const int64_t m_pad = sorted_slots.dimensions()[0];
  const int64_t inter = act.dimensions()[1];
  if (act.dimensions()[0] != m_pad) {
    return Invalid(kGemm1, "act has shape " + Dims(act) + "; expected m_pad = " +
                               std::to_string(m_pad) + " rows");
  }
  JAX_MOE_RETURN_IF_ERROR(CheckMultiple(kGemm1, "hidden", h, 64));
  JAX_MOE_RETURN_IF_ERROR(CheckMultiple(kGemm1, "intermediate", inter, 64));
  JAX_MOE_RETURN_IF_ERROR(
      CheckWeights(kGemm1, "w13", w13_packed, w13_scale, w13_global, 2 * inter, h));
  JAX_MOE_RETURN_IF_ERROR(CheckDimsInt32(kGemm1, "hidden", hidden));
  JAX_MOE_RETURN_IF_ERROR(CheckDimsInt32(kGemm1, "act", act));
  if (hidden.dimensions()[0] * top_k > std::numeric_limits<int32_t>::max()) {
    return Invalid(kGemm1, "num_tokens * top_k must be < 2^31");
  }
  if (m_pad == 0 || inter == 0) {
    return CheckBuffer(kGemm1, "workspace", workspace, ffi::DataType::S32, 1);
  }
  if (hidden.dimensions()[0] > 0 && h > 0) {
    JAX_MOE_RETURN_IF_ERROR(
        CheckAligned(kGemm1, "hidden", hidden.untyped_data(), kVectorAlignment));
  }
  JAX_MOE_RETURN_IF_ERROR(
      CheckAligned(kGemm1, "act", act.untyped_data(), kVectorAlignment));
  JAX_MOE_RETURN_IF_ERROR(CheckWorkspace(kGemm1, kernel, workspace,
                                         tile_expert.dimensions()[0], 2 * inter,
                                         num_ctas, counter_words));
  *empty = false;
  return ffi::Error::Success();
}

ffi::Error MoeGemm1Execute(cudaStream_t stream, ffi::AnyBuffer hidden,
                           ffi::AnyBuffer sorted_slots,
                           ffi::AnyBuffer tile_expert,
                           ffi::AnyBuffer w13_packed, ffi::AnyBuffer w13_scale,
                           ffi::AnyBuffer w13_global,
                           ffi::Result<ffi::AnyBuffer> act,
                           ffi::Result<ffi::AnyBuffer> workspace, int32_t top_k,
                           int32_t num_ctas, int32_t variant) {
  bool empty = true;
  int64_t counter_words = 0;
  JAX_MOE_RETURN_IF_ERROR(CheckGemm1(hidden, sorted_slots, tile_expert, w13_packed,
                                     w13_scale, w13_global, *act, *workspace, top_k,
                                     num_ctas, variant, &counter_words, &empty));
  if (empty) return ffi::Error::Success();
  const jax_moe_moe_gemm1_variant_t& kernel = jax_moe_moe_gemm1_variants[variant];
  JAX_MOE_RETURN_IF_ERROR(LoadVariant(kGemm1, kernel));
  JAX_MOE_RETURN_IF_ERROR(ClearCounters(kGemm1, *workspace, counter_words, stream));

  jax_moe_moe_gemm1_hidden_t hidden_arg{};
  jax_moe_moe_gemm1_sorted_slots_t sorted_slots_arg{};
  jax_moe_moe_gemm1_tile_expert_t tile_expert_arg{};
  jax_moe_moe_gemm1_w13_packed_t packed_arg{};
  jax_moe_moe_gemm1_w13_scale_t scale_arg{};
  jax_moe_moe_gemm1_w13_global_t global_arg{};
  jax_moe_moe_gemm1_act_t act_arg{};
  jax_moe_moe_gemm1_workspace_t workspace_arg{};
  FillDescriptor<2>(hidden_arg, hidden);
  FillDescriptor<1>(sorted_slots_arg, sorted_slots);
  FillDescriptor<1>(tile_expert_arg, tile_expert);
  FillDescriptor<3>(packed_arg, w13_packed);
  FillDescriptor<3>(scale_arg, w13_scale);
  FillDescriptor<1>(global_arg, w13_global);
  FillDescriptor<2>(act_arg, *act);
  FillDescriptor<1>(workspace_arg, *workspace);
  const int32_t status =
      kernel.launch(&hidden_arg, &sorted_slots_arg, &tile_expert_arg, &packed_arg,
                    &scale_arg, &global_arg, &act_arg, top_k, &workspace_arg,
                    num_ctas, stream);
  return CheckLaunch(kGemm1, kernel.name, status);
}

// CPU target with the GEMM1 execute handler's checks and no launch (the results are
// left unwritten), so the argument checks can be tested without a GPU.
ffi::Error MoeGemm1Check(ffi::AnyBuffer hidden, ffi::AnyBuffer sorted_slots,
                         ffi::AnyBuffer tile_expert, ffi::AnyBuffer w13_packed,
                         ffi::AnyBuffer w13_scale, ffi::AnyBuffer w13_global,
                         ffi::Result<ffi::AnyBuffer> act,
                         ffi::Result<ffi::AnyBuffer> workspace, int32_t top_k,
                         int32_t num_ctas, int32_t variant) {
  bool empty = true;
  int64_t counter_words = 0;
  return CheckGemm1(hidden, sorted_slots, tile_expert, w13_packed, w13_scale, w13_global,
                    *act, *workspace, top_k, num_ctas, variant, &counter_words, &empty);
}
#endif  // JAX_MOE_HAS_MOE_GEMM1

#if defined(JAX_MOE_HAS_MOE_GEMM2)
constexpr std::string_view kGemm2 = "jax_moe_moe_gemm2";

ffi::Error MoeGemm2Instantiate(ffi::Dictionary attrs) {
  return InstantiateVariant(kGemm2, attrs, jax_moe_moe_gemm2_variants,
                            JAX_MOE_MOE_GEMM2_NUM_VARIANTS);
}

// Every check of the GEMM2 execute handler; `*empty` is set when there is nothing
// to launch, `*counter_words` to the stream-K counters to clear.
ffi::Error CheckGemm2(const ffi::AnyBuffer& act, const ffi::AnyBuffer& sorted_slots,
                      const ffi::AnyBuffer& tile_expert, const ffi::AnyBuffer& w2_packed,
                      const ffi::AnyBuffer& w2_scale, const ffi::AnyBuffer& w2_global,
                      const ffi::AnyBuffer& topk_weights, const ffi::AnyBuffer& y,
                      const ffi::AnyBuffer& workspace, int32_t num_ctas, int32_t variant,
                      int64_t* counter_words, bool* empty) {
  *empty = true;
  *counter_words = 0;
  JAX_MOE_RETURN_IF_ERROR(
      CheckVariant(kGemm2, variant, JAX_MOE_MOE_GEMM2_NUM_VARIANTS));
  const jax_moe_moe_gemm2_variant_t& kernel = jax_moe_moe_gemm2_variants[variant];
  JAX_MOE_RETURN_IF_ERROR(CheckBuffer(kGemm2, "act", act, ffi::DataType::BF16, 2));
  JAX_MOE_RETURN_IF_ERROR(CheckBuffer(kGemm2, "y", y, ffi::DataType::BF16, 2));
  JAX_MOE_RETURN_IF_ERROR(
      CheckBuffer(kGemm2, "topk_weights", topk_weights, ffi::DataType::F32, 1));
  JAX_MOE_RETURN_IF_ERROR(CheckRouting(kGemm2, kernel, sorted_slots, tile_expert));
  const int64_t m_pad = sorted_slots.dimensions()[0];
  const int64_t inter = act.dimensions()[1];
  const int64_t h = y.dimensions()[1];
  if (act.dimensions()[0] != m_pad || y.dimensions()[0] != m_pad) {
    return Invalid(kGemm2, "act has shape " + Dims(act) + " and y " + Dims(y) +
                               "; both need m_pad = " + std::to_string(m_pad) + " rows");
  }
  JAX_MOE_RETURN_IF_ERROR(CheckMultiple(kGemm2, "intermediate", inter, 64));
  JAX_MOE_RETURN_IF_ERROR(CheckMultiple(kGemm2, "hidden", h, 128));
  JAX_MOE_RETURN_IF_ERROR(
      CheckWeights(kGemm2, "w2", w2_packed, w2_scale, w2_global, h, inter));
  JAX_MOE_RETURN_IF_ERROR(CheckDimsInt32(kGemm2, "act", act));
  JAX_MOE_RETURN_IF_ERROR(CheckDimsInt32(kGemm2, "y", y));
  JAX_MOE_RETURN_IF_ERROR(CheckDimsInt32(kGemm2, "topk_weights", topk_weights));
  if (m_pad == 0 || h == 0) {
    return CheckBuffer(kGemm2, "workspace", workspace, ffi::DataType::S32, 1);
  }
  if (inter > 0) {
    JAX_MOE_RETURN_IF_ERROR(
        CheckAligned(kGemm2, "act", act.untyped_data(), kVectorAlignment));
  }
  JAX_MOE_RETURN_IF_ERROR(CheckAligned(kGemm2, "y", y.untyped_data(), kVectorAlignment));
  JAX_MOE_RETURN_IF_ERROR(CheckWorkspace(kGemm2, kernel, workspace,
                                         tile_expert.dimensions()[0], h, num_ctas,
                                         counter_words));
  *empty = false;
  return ffi::Error::Success();
}

ffi::Error MoeGemm2Execute(cudaStream_t stream, ffi::AnyBuffer act,
                           ffi::AnyBuffer sorted_slots,
                           ffi::AnyBuffer tile_expert, ffi::AnyBuffer w2_packed,
                           ffi::AnyBuffer w2_scale, ffi::AnyBuffer w2_global,
                           ffi::AnyBuffer topk_weights,
                           ffi::Result<ffi::AnyBuffer> y,
                           ffi::Result<ffi::AnyBuffer> workspace, int32_t num_ctas,
                           int32_t variant) {
  bool empty = true;
  int64_t counter_words = 0;
  JAX_MOE_RETURN_IF_ERROR(CheckGemm2(act, sorted_slots, tile_expert, w2_packed, w2_scale,
                                     w2_global, topk_weights, *y, *workspace, num_ctas,
                                     variant, &counter_words, &empty));
  if (empty) return ffi::Error::Success();
  const jax_moe_moe_gemm2_variant_t& kernel = jax_moe_moe_gemm2_variants[variant];
  JAX_MOE_RETURN_IF_ERROR(LoadVariant(kGemm2, kernel));
  JAX_MOE_RETURN_IF_ERROR(ClearCounters(kGemm2, *workspace, counter_words, stream));

  jax_moe_moe_gemm2_act_t act_arg{};
  jax_moe_moe_gemm2_sorted_slots_t sorted_slots_arg{};
  jax_moe_moe_gemm2_tile_expert_t tile_expert_arg{};
  jax_moe_moe_gemm2_w2_packed_t packed_arg{};
  jax_moe_moe_gemm2_w2_scale_t scale_arg{};
  jax_moe_moe_gemm2_w2_global_t global_arg{};
  jax_moe_moe_gemm2_topk_weights_t weights_arg{};
  jax_moe_moe_gemm2_y_t y_arg{};
  jax_moe_moe_gemm2_workspace_t workspace_arg{};
  FillDescriptor<2>(act_arg, act);
  FillDescriptor<1>(sorted_slots_arg, sorted_slots);
  FillDescriptor<1>(tile_expert_arg, tile_expert);
  FillDescriptor<3>(packed_arg, w2_packed);
  FillDescriptor<3>(scale_arg, w2_scale);
  FillDescriptor<1>(global_arg, w2_global);
  FillDescriptor<1>(weights_arg, topk_weights);
  FillDescriptor<2>(y_arg, *y);
  FillDescriptor<1>(workspace_arg, *workspace);
  const int32_t status =
      kernel.launch(&act_arg, &sorted_slots_arg, &tile_expert_arg, &packed_arg,
                    &scale_arg, &global_arg, &weights_arg, &y_arg, &workspace_arg,
                    num_ctas, stream);
  return CheckLaunch(kGemm2, kernel.name, status);
}

// CPU target with the GEMM2 execute handler's checks and no launch.
ffi::Error MoeGemm2Check(ffi::AnyBuffer act, ffi::AnyBuffer sorted_slots,
                         ffi::AnyBuffer tile_expert, ffi::AnyBuffer w2_packed,
                         ffi::AnyBuffer w2_scale, ffi::AnyBuffer w2_global,
                         ffi::AnyBuffer topk_weights, ffi::Result<ffi::AnyBuffer> y,
                         ffi::Result<ffi::AnyBuffer> workspace, int32_t num_ctas,
                         int32_t variant) {
  bool empty = true;
  int64_t counter_words = 0;
  return CheckGemm2(act, sorted_slots, tile_expert, w2_packed, w2_scale, w2_global,
                    topk_weights, *y, *workspace, num_ctas, variant, &counter_words,
                    &empty);
}
#endif  // JAX_MOE_HAS_MOE_GEMM2

}  // namespace
}  // namespace jax_moe

#if defined(JAX_MOE_HAS_MOE_GEMM1)
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMoeMoeGemm1Instantiate,
                              jax_moe::MoeGemm1Instantiate,
                              xla::ffi::Ffi::BindInstantiate().Attrs());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxMoeMoeGemm1Execute, jax_moe::MoeGemm1Execute,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Arg<xla::ffi::AnyBuffer>()  // hidden: bfloat16 (num_tokens, hidden)
        .Arg<xla::ffi::AnyBuffer>()  // sorted_slots: int32 (m_pad,)
        .Arg<xla::ffi::AnyBuffer>()  // tile_expert: int32 (m_pad / block_m,)
        .Arg<xla::ffi::AnyBuffer>()  // w13_packed: uint8 (experts, 2 * inter, hidden / 2)
        .Arg<xla::ffi::AnyBuffer>()  // w13_scale: uint8 (experts, 2 * inter, hidden / 16)
        .Arg<xla::ffi::AnyBuffer>()  // w13_global: float32 (experts,)
        .Ret<xla::ffi::AnyBuffer>()  // act: bfloat16 (m_pad, inter)
        .Ret<xla::ffi::AnyBuffer>()  // workspace: int32 (words,), stream-K variants
        .Attr<int32_t>("top_k")      // experts per token
        .Attr<int32_t>("num_ctas")   // stream-K grid size (ignored by other variants)
        .Attr<int32_t>("variant"),   // index into jax_moe_moe_gemm1_variants
    {xla::ffi::Traits::kCmdBufferCompatible});
#endif

#if defined(JAX_MOE_HAS_MOE_GEMM1)
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxMoeMoeGemm1Check, jax_moe::MoeGemm1Check,
    xla::ffi::Ffi::Bind()
        .Arg<xla::ffi::AnyBuffer>()  // hidden
        .Arg<xla::ffi::AnyBuffer>()  // sorted_slots
        .Arg<xla::ffi::AnyBuffer>()  // tile_expert
        .Arg<xla::ffi::AnyBuffer>()  // w13_packed
        .Arg<xla::ffi::AnyBuffer>()  // w13_scale
        .Arg<xla::ffi::AnyBuffer>()  // w13_global
        .Ret<xla::ffi::AnyBuffer>()  // act, unwritten
        .Ret<xla::ffi::AnyBuffer>()  // workspace, unwritten
        .Attr<int32_t>("top_k")
        .Attr<int32_t>("num_ctas")
        .Attr<int32_t>("variant"));
#endif

#if defined(JAX_MOE_HAS_MOE_GEMM2)
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMoeMoeGemm2Instantiate,
                              jax_moe::MoeGemm2Instantiate,
                              xla::ffi::Ffi::BindInstantiate().Attrs());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxMoeMoeGemm2Execute, jax_moe::MoeGemm2Execute,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Arg<xla::ffi::AnyBuffer>()  // act: bfloat16 (m_pad, inter)
        .Arg<xla::ffi::AnyBuffer>()  // sorted_slots: int32 (m_pad,)
        .Arg<xla::ffi::AnyBuffer>()  // tile_expert: int32 (m_pad / block_m,)
        .Arg<xla::ffi::AnyBuffer>()  // w2_packed: uint8 (experts, hidden, inter / 2)
        .Arg<xla::ffi::AnyBuffer>()  // w2_scale: uint8 (experts, hidden, inter / 16)
        .Arg<xla::ffi::AnyBuffer>()  // w2_global: float32 (experts,)
        .Arg<xla::ffi::AnyBuffer>()  // topk_weights: float32 (num_tokens * top_k,)
        .Ret<xla::ffi::AnyBuffer>()  // y: bfloat16 (m_pad, hidden)
        .Ret<xla::ffi::AnyBuffer>()  // workspace: int32 (words,), stream-K variants
        .Attr<int32_t>("num_ctas")   // stream-K grid size (ignored by other variants)
        .Attr<int32_t>("variant"),   // index into jax_moe_moe_gemm2_variants
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxMoeMoeGemm2Check, jax_moe::MoeGemm2Check,
    xla::ffi::Ffi::Bind()
        .Arg<xla::ffi::AnyBuffer>()  // act
        .Arg<xla::ffi::AnyBuffer>()  // sorted_slots
        .Arg<xla::ffi::AnyBuffer>()  // tile_expert
        .Arg<xla::ffi::AnyBuffer>()  // w2_packed
        .Arg<xla::ffi::AnyBuffer>()  // w2_scale
        .Arg<xla::ffi::AnyBuffer>()  // w2_global
        .Arg<xla::ffi::AnyBuffer>()  // topk_weights
        .Ret<xla::ffi::AnyBuffer>()  // y, unwritten
        .Ret<xla::ffi::AnyBuffer>()  // workspace, unwritten
        .Attr<int32_t>("num_ctas")
        .Attr<int32_t>("variant"));
#endif

#endif  // JAX_MOE_HAS_MOE_GEMM1 || JAX_MOE_HAS_MOE_GEMM2
