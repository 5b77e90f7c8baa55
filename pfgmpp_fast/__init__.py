"""pfgmpp_fast: fused kernels, fast networks and evaluation for PFGM++ generative models.

The public API (imported lazily, so `import pfgmpp_fast` stays cheap):

    perturb, perturb_net_input, prior          the Student-t perturbation and the prior
    published_prior                            latents drawn per seed as the published generate.py draws them
    training_loss, PFGMPPLoss                  the fused EDM/PFGM++ objective
    sample, Sampler, SamplerOptions            Heun/Euler sampling on fused steps; SamplerOptions: the
                                               sampler settings, checked once (sample/Sampler/generate/FID)
    UNCOND                                     gnet='uncond': classifier-free guidance (sample(guidance=W, gnet=))
    build_network, make_fast, EDMPrecond       DDPM++ / NCSN++ / ADM networks
    save_network, load_network                 safe checkpoints (published pickles need trust_pickle=True)
    reference                                  the pure-PyTorch spec everything is tested against

Every op takes backend='auto'|'reference'|'triton'|'cuda'|'cpu'.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "perturb": "ops",
    "perturb_net_input": "ops",
    "prior": "ops",
    "noise_scale": "ops",
    "training_scalars": "ops",
    "resolve_backend": "ops",
    "BACKENDS": "checks",
    "training_loss": "loss",
    "PFGMPPLoss": "loss",
    "sample": "sampler",
    "Sampler": "sampler",
    "SamplerOptions": "sampler",
    "UNCOND": "sampler",
    "published_prior": "published_rng",
    "build_network": "networks",
    "make_fast": "networks",
    "EDMPrecond": "networks",
    "save_network": "checkpoint",
    "load_network": "checkpoint",
    "convert_published": "checkpoint",
}

__all__ = sorted(_EXPORTS) + ["reference", "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    if name == "reference":
        return importlib.import_module(f"{__name__}.reference")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
