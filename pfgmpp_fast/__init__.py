"""pfgmpp_fast: fused kernels, fast networks and evaluation for PFGM++ generative models."""
__version__ = "0.1.0"
