// NVSHMEM initialisation of one loaded module (a shared library that links the static
// device library has its own device-side NVSHMEM state).
//
// MIXCC_NVSHMEM_MODULE_INIT defines `int mixcc_module_init(uid, rank, npes)`: the first
// module of a process also initialises the host library (bootstrap through the unique
// id, collective over all PEs); a later module finds it initialised and binds its own
// device state. It returns the NVSHMEM status instead of exiting, which the header's
// inline wrappers (nvshmem_init, nvshmemx_init_attr) would do.
#pragma once
#include <nvshmem.h>
#include <nvshmemx.h>
#include <string.h>

#define MIXCC_NVSHMEM_MODULE_INIT                                                              \
  int mixcc_module_init(const void* uid, int rank, int npes) {                               \
    nvshmemx_uniqueid_t id;                                                                  \
    memcpy(&id, uid, sizeof(id));                                                            \
    nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;                              \
    int status = nvshmemx_set_attr_uniqueid_args(rank, npes, &id, &attr);                    \
    if (status != 0) return status;                                                          \
    int provided = 0;                                                                        \
    nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION, \
                                  NVSHMEM_VENDOR_PATCH_VERSION};                             \
    return nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided,                        \
                                NVSHMEMX_INIT_WITH_UNIQUEID, &attr, version);                \
  }
