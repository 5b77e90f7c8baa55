"""`--guidance W --gnet PATH|uncond` of `generate` and `fid`: the guide network of the command line
(the guidance itself: pfgmpp_fast/guidance.py)."""

from __future__ import annotations

from typing import Callable

from pfgmpp_fast.guidance import UNCOND, check_guide_network
from pfgmpp_fast.utils.cli_errors import UsageError, blame

__all__ = ["guide_from_args"]


def guide_from_args(args, net, load_network: Callable, required: bool = False):
    """The guide of --gnet for `net`: 'uncond', or `load_network(path)` (the caller loads and makes
    it fast as --network) with the network's D and image shape; None without --gnet. Errors name
    --gnet (also when it is missing with --guidance != 1, or `required`)."""
    if args.gnet is None:
        if args.guidance != 1.0 or required:
            raise UsageError(
                "--gnet",
                "is required for --kind guidance" if required else f"is required with --guidance {args.guidance:g}",
            )
        return None
    with blame("--gnet"):
        gnet = args.gnet if args.gnet == UNCOND else load_network(args.gnet)
        check_guide_network(net, gnet, float(net.D))
    return gnet
