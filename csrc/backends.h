// Entry points of the two kernel back ends. Both take the plain parameter structs of
// kernel_params.h; the host layer (ops.cpp) validates, allocates and calls them.
#pragma once
#include "kernel_params.h"

namespace pfgmpp {

namespace cpu {
void philox4x32(const RawPhiloxParams& p);
void philox_normal(const NormalParams& p);
void chi2(const Chi2Params& p);
void perturb(const PerturbParams& p);
void loss_fwd_bwd(const LossParams& p);
void sampler_update(const SamplerParams& p);
}  // namespace cpu

#ifdef PFGMPP_WITH_CUDA
// `stream` is a cudaStream_t; launches go to that stream and are checked right away.
namespace cuda {
void philox4x32(const RawPhiloxParams& p, void* stream);
void philox_normal(const NormalParams& p, void* stream);
void chi2(const Chi2Params& p, void* stream);
void perturb(const PerturbParams& p, void* stream);
// The loss reduces per sample deterministically through `partials` ([B, chunks] floats).
int64_t loss_num_chunks(const LossParams& p);
void loss_fwd_bwd(const LossParams& p, float* partials, void* stream);
void sampler_update(const SamplerParams& p, void* stream);
}  // namespace cuda
#endif

}  // namespace pfgmpp
