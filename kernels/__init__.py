"""Triton kernels of pfgmpp_fast, imported as pfgmpp_fast.kernels.

One file per fused op (philox, chi2, perturb, loss, sampler_step): its Triton kernel(s), the
launcher taking the argument list of the op in docs/KERNEL_OPS.md, and the launcher's
registration as torch.ops.pfgmpp_fast_triton.<op>.  layout.py holds what they share;
aot_check.py compiles them for a GPU target without one.  Importing this package registers
every op (pfgmpp_fast.ops imports it once, at its own import).
"""

from . import chi2, loss, perturb, philox, sampler_step  # noqa: F401  (registers the ops)
