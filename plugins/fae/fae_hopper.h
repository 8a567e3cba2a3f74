// Internal interface of the Hopper (sm_90a) FAE kernel (fae_hopper.cu); used by fae.cu only.
#pragma once

#include "fae.h"

namespace toprovar_fae_hopper {

enum : int {
    FAE_HOPPER_STAGES2 = 1,   // 2 K/V pipeline stages instead of 3
    FAE_HOPPER_PINGPONG = 2   // consumer warpgroups take turns issuing GEMMs (3 stages)
};

// True when this build holds sm_90a code of the kernel, the current device is compute 9.0, the driver
// exposes cuTensorMapEncodeTiled, and p's head dim (128) and dtype (bf16/fp16) are supported.
bool available(const FaeParams* p);
// Launch on `stream` (p validated by fae_forward; h_heads is (B, H, Nq) float32). FAE_OK or an error.
int forward(const FaeParams* p, float* h_heads, int flags, cudaStream_t stream);

}  // namespace toprovar_fae_hopper
