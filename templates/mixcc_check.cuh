// Error checking for host code: every CUDA call returns through MIXCC_CHECK, which
// hands the error code back to Python (no exit() inside a library).
#pragma once
#include <cuda_runtime.h>

#define MIXCC_CHECK(call)                     \
  do {                                        \
    cudaError_t mixcc_err_ = (call);          \
    if (mixcc_err_ != cudaSuccess) return (int)mixcc_err_; \
  } while (0)
