// The nanobind module `jax_moe._jax_moe_ffi`: FFI handler capsules and the
// contents of the kernel table. Python (jax_moe/_ffi.py) registers the
// handlers with jax.ffi.register_ffi_target(..., platform="CUDA") once, on
// first GPU use. Importing this module touches no GPU.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <stdexcept>
#include <string>

#include "jax_moe_ffi.h"

namespace nb = nanobind;

namespace {

template <typename T>
nb::capsule EncapsulateHandler(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>,
                "an XLA FFI handler takes XLA_FFI_CallFrame* and returns XLA_FFI_Error*");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

// {"instantiate": capsule, "execute": capsule}, the stages of one target.
nb::dict Stages(XLA_FFI_Handler* instantiate, XLA_FFI_Handler* execute) {
  nb::dict stages;
  stages["instantiate"] = EncapsulateHandler(instantiate);
  stages["execute"] = EncapsulateHandler(execute);
  return stages;
}

}  // namespace

NB_MODULE(_jax_moe_ffi, m) {
  m.doc() = "XLA FFI handlers and ahead-of-time CuTe DSL kernels of jax_moe.";

  m.def(
      "registrations",
      []() {
        nb::dict targets;
#if defined(JAX_MOE_HAS_COMBINE)
        targets["jax_moe_combine"] =
            Stages(JaxMoeCombineInstantiate, JaxMoeCombineExecute);
#endif
#if defined(JAX_MOE_HAS_MOE_GEMM1)
        targets["jax_moe_moe_gemm1"] =
            Stages(JaxMoeMoeGemm1Instantiate, JaxMoeMoeGemm1Execute);
#endif
#if defined(JAX_MOE_HAS_MOE_GEMM2)
        targets["jax_moe_moe_gemm2"] =
            Stages(JaxMoeMoeGemm2Instantiate, JaxMoeMoeGemm2Execute);
#endif
#if defined(JAX_MOE_HAS_ROUTING)
        targets["jax_moe_routing"] = Stages(JaxMoeRoutingInstantiate, JaxMoeRoutingExecute);
#endif
        nb::dict record_event;
        record_event["execute"] = EncapsulateHandler(JaxMoeRecordEvent);
        targets["jax_moe_record_event"] = record_event;
        return targets;
      },
      "FFI target name -> {stage name: handler capsule}, for "
      "jax.ffi.register_ffi_target(name, stages, platform='CUDA').");

  m.def(
      "cpu_check_registrations",
      []() {
        nb::dict targets;
#if defined(JAX_MOE_HAS_COMBINE)
        targets["jax_moe_combine_check"] = EncapsulateHandler(JaxMoeCombineCheck);
#endif
#if defined(JAX_MOE_HAS_ROUTING)
        targets["jax_moe_routing_check"] = EncapsulateHandler(JaxMoeRoutingCheck);
#endif
#if defined(JAX_MOE_HAS_MOE_GEMM1)
        targets["jax_moe_moe_gemm1_check"] = EncapsulateHandler(JaxMoeMoeGemm1Check);
#endif
#if defined(JAX_MOE_HAS_MOE_GEMM2)
        targets["jax_moe_moe_gemm2_check"] = EncapsulateHandler(JaxMoeMoeGemm2Check);
#endif
        return targets;
      },
      "CPU targets that run an op's argument checks without launching: "
      "target name -> handler capsule, for register_ffi_target(..., platform='cpu').");

  m.def(
      "kernel_variants",
      []() {
        nb::dict ops;
        for (int i = 0; i < JAX_MOE_NUM_KERNEL_OPS; ++i) {
          const jax_moe_kernel_op_t& op = jax_moe_kernel_ops[i];
          nb::list names;
          for (int32_t j = 0; j < op.num_variants; ++j) {
            names.append(nb::str(op.variant_names[j]));
          }
          ops[op.op] = names;
        }
        return ops;
      },
      "op name -> variant names in id order (the `variant` attribute is the "
      "position in this list).");

  m.def(
      "event_elapsed_ms",
      [](int32_t start, int32_t stop) {
        float ms = 0.0f;
        std::string error;
        {
          nb::gil_scoped_release release;
          error = jax_moe::EventElapsedMs(start, stop, &ms);
        }
        if (!error.empty()) throw std::runtime_error("event_elapsed_ms: " + error);
        return ms;
      },
      nb::arg("start"), nb::arg("stop"),
      "Milliseconds between the latest records of two event slots of "
      "jax_moe_record_event, after waiting for the second (RuntimeError if "
      "either was never recorded or CUDA fails).");
  m.attr("EVENT_SLOTS") = jax_moe::kEventSlots;

  m.attr("KERNEL_ARCH") = JAX_MOE_KERNELS_ARCH;
  m.attr("DSL_VERSION") = JAX_MOE_KERNELS_DSL_VERSION;
}
