// Native half of mixcc's NVSHMEM runtime: unique id, initialisation, the symmetric
// workspace. Every function returns 0 on success, else an NVSHMEM or CUDA status;
// Python turns a failure into an exception naming the call (mixcc/nvshmem.py).
#include <cuda_runtime.h>
#include <string.h>

#include "nvshmem_init.cuh"

extern "C" {

MIXCC_NVSHMEM_MODULE_INIT

int mixcc_nv_uniqueid_size() { return (int)sizeof(nvshmemx_uniqueid_t); }

int mixcc_nv_uniqueid(void* out) {
  nvshmemx_uniqueid_t id;
  int status = nvshmemx_get_uniqueid(&id);
  memcpy(out, &id, sizeof(id));
  return status;
}

int mixcc_nv_my_pe() { return nvshmem_my_pe(); }
int mixcc_nv_n_pes() { return nvshmem_n_pes(); }

// Collective: a zero-filled symmetric buffer (signals and credits start at 0).
int mixcc_nv_malloc(size_t bytes, void** ptr) {
  *ptr = nvshmem_malloc(bytes);
  if (*ptr == nullptr) return (int)cudaErrorMemoryAllocation;
  cudaError_t e = cudaMemset(*ptr, 0, bytes);
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  if (e != cudaSuccess) return (int)e;
  nvshmem_barrier_all();
  return 0;
}

// Collective (NVSHMEM frees with a barrier).
int mixcc_nv_free(void* ptr) {
  nvshmem_free(ptr);
  return 0;
}

int mixcc_nv_finalize() {
  nvshmem_finalize();
  return 0;
}

}  // extern "C"
