// Native half of the mixcc runtime: workspace memory, CUDA IPC handles and the
// host-mapped error record. Every function returns a cudaError_t (0 = success);
// Python turns a failure into an exception naming the call.
#include <cuda_runtime.h>
#include <string.h>

#include "mixcc_check.cuh"

extern "C" {

int mixcc_rt_abi_version() { return 1; }

// Zero-filled device memory on `device` (flags start at epoch 0).
int mixcc_rt_alloc(int device, size_t bytes, void** ptr) {
  MIXCC_CHECK(cudaSetDevice(device));
  MIXCC_CHECK(cudaMalloc(ptr, bytes));
  MIXCC_CHECK(cudaMemset(*ptr, 0, bytes));
  MIXCC_CHECK(cudaDeviceSynchronize());
  return 0;
}

int mixcc_rt_free(int device, void* ptr) {
  MIXCC_CHECK(cudaSetDevice(device));
  MIXCC_CHECK(cudaFree(ptr));
  return 0;
}

// handle: 64 bytes (cudaIpcMemHandle_t).
int mixcc_rt_ipc_handle(int device, void* ptr, void* handle) {
  MIXCC_CHECK(cudaSetDevice(device));
  cudaIpcMemHandle_t h;
  MIXCC_CHECK(cudaIpcGetMemHandle(&h, ptr));
  memcpy(handle, &h, sizeof(h));
  return 0;
}

int mixcc_rt_ipc_open(int device, const void* handle, void** ptr) {
  MIXCC_CHECK(cudaSetDevice(device));
  cudaIpcMemHandle_t h;
  memcpy(&h, handle, sizeof(h));
  MIXCC_CHECK(cudaIpcOpenMemHandle(ptr, h, cudaIpcMemLazyEnablePeerAccess));
  return 0;
}

int mixcc_rt_ipc_close(int device, void* ptr) {
  MIXCC_CHECK(cudaSetDevice(device));
  MIXCC_CHECK(cudaIpcCloseMemHandle(ptr));
  return 0;
}

// Pinned host memory mapped into the device's address space (zero-filled).
int mixcc_rt_host_alloc(size_t bytes, void** host, void** dev) {
  MIXCC_CHECK(cudaHostAlloc(host, bytes, cudaHostAllocMapped | cudaHostAllocPortable));
  memset(*host, 0, bytes);
  MIXCC_CHECK(cudaHostGetDevicePointer(dev, *host, 0));
  return 0;
}

int mixcc_rt_host_free(void* host) {
  MIXCC_CHECK(cudaFreeHost(host));
  return 0;
}

int mixcc_rt_memcpy_htod(int device, void* dst, const void* src, size_t bytes) {
  MIXCC_CHECK(cudaSetDevice(device));
  MIXCC_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
  return 0;
}

const char* mixcc_rt_error_string(int err) { return cudaGetErrorString((cudaError_t)err); }

}  // extern "C"
