// Device-time measurement: the XLA FFI target `jax_moe_record_event` records a
// CUDA event on XLA's stream, and `event_elapsed_ms` (registrations.cc) reads
// the time between two recorded events. The tuner's profiler brackets a
// jitted loop of kernel launches with two records, so its timings exclude the
// host's dispatch and synchronization.
//
//   x     any array; the result is the same buffer (aliased), so a record is
//         ordered after the op that produced `x` and before every op that
//         consumes the result
// Attributes:
//   slot  int32 in [0, kEventSlots): which event to record
//
// Events live in a process-wide table, one per (slot, device), shared by every
// program of the process. A record overwrites the slot's previous record. The handler is not command-buffer
// compatible on purpose: it runs as its own step on the stream, never inside a
// captured CUDA graph.
#include <array>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "jax_moe_ffi.h"

namespace jax_moe {
namespace {

constexpr std::string_view kOp = "jax_moe_record_event";

struct EventTable {
  std::mutex mutex;
  // (slot, device) -> event, created on first record with timing enabled.
  std::map<std::pair<int32_t, int>, cudaEvent_t> events;
  // slot -> device of its latest record (-1: never recorded).
  std::array<int, kEventSlots> last_device;
  EventTable() { last_device.fill(-1); }
};

EventTable& Table() {
  static EventTable* table = new EventTable();  // never destroyed: outlives XLA
  return *table;
}

// Runs `fn` with `device` current for the CUDA runtime, restoring the previous one.
template <typename Fn>
cudaError_t OnDevice(int device, Fn&& fn) {
  int previous = 0;
  cudaError_t status = cudaGetDevice(&previous);
  if (status != cudaSuccess) return status;
  if (previous != device && (status = cudaSetDevice(device)) != cudaSuccess) {
    return status;
  }
  cudaError_t result = fn();
  if (previous != device) {
    status = cudaSetDevice(previous);
    if (result == cudaSuccess) result = status;
  }
  return result;
}

ffi::Error RecordEvent(cudaStream_t stream, ffi::AnyBuffer x,
                       ffi::Result<ffi::AnyBuffer> out, int32_t slot) {
  if (slot < 0 || slot >= kEventSlots) {
    return Invalid(kOp, "slot = " + std::to_string(slot) + " is not in [0, " +
                            std::to_string(kEventSlots) + ")");
  }
  if (x.untyped_data() != out->untyped_data() && x.size_bytes() > 0) {
    // Normally aliased; copy if XLA gave the result its own buffer.
    JAX_MOE_RETURN_IF_ERROR(CudaStatus(
        kOp, "cudaMemcpyAsync",
        cudaMemcpyAsync(out->untyped_data(), x.untyped_data(), x.size_bytes(),
                        cudaMemcpyDeviceToDevice, stream)));
  }
  int device = 0;
  JAX_MOE_RETURN_IF_ERROR(
      CudaStatus(kOp, "cudaStreamGetDevice", cudaStreamGetDevice(stream, &device)));
  EventTable& table = Table();
  std::lock_guard<std::mutex> lock(table.mutex);
  cudaEvent_t& event = table.events[{slot, device}];
  if (event == nullptr) {
    JAX_MOE_RETURN_IF_ERROR(CudaStatus(kOp, "cudaEventCreate", OnDevice(device, [&] {
                                         return cudaEventCreate(&event);
                                       })));
  }
  JAX_MOE_RETURN_IF_ERROR(
      CudaStatus(kOp, "cudaEventRecord", cudaEventRecord(event, stream)));
  table.last_device[slot] = device;
  return ffi::Error::Success();
}

}  // namespace

std::string EventElapsedMs(int32_t start, int32_t stop, float* ms) {
  for (int32_t slot : {start, stop}) {
    if (slot < 0 || slot >= kEventSlots) {
      return "slot " + std::to_string(slot) + " is not in [0, " +
             std::to_string(kEventSlots) + ")";
    }
  }
  cudaEvent_t start_event = nullptr;
  cudaEvent_t stop_event = nullptr;
  int device = -1;
  {
    EventTable& table = Table();
    std::lock_guard<std::mutex> lock(table.mutex);
    device = table.last_device[stop];
    if (device < 0 || table.last_device[start] != device) {
      return "slots " + std::to_string(start) + " and " + std::to_string(stop) +
             " were not both recorded on one device";
    }
    start_event = table.events[{start, device}];
    stop_event = table.events[{stop, device}];
  }
  cudaError_t status = OnDevice(device, [&] {
    cudaError_t s = cudaEventSynchronize(stop_event);
    if (s != cudaSuccess) return s;
    return cudaEventElapsedTime(ms, start_event, stop_event);
  });
  if (status != cudaSuccess) {
    return std::string("cudaEventElapsedTime failed: ") + cudaGetErrorName(status) +
           ": " + cudaGetErrorString(status);
  }
  if (*ms < 0.0f) {
    return "slot " + std::to_string(start) + " was recorded after slot " +
           std::to_string(stop);
  }
  return "";
}

}  // namespace jax_moe

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxMoeRecordEvent, jax_moe::RecordEvent,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Arg<xla::ffi::AnyBuffer>()  // x: any array
        .Ret<xla::ffi::AnyBuffer>()  // the same array (aliased to x)
        .Attr<int32_t>("slot"));     // event slot, [0, kEventSlots)
