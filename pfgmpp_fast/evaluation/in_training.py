"""In-training evaluation: the metrics of a training run's EMA network at each network snapshot,
through the streaming `fid calc` path (calc.GeneratorSource → calc.calc_stats → metrics.compute_metrics).

:class:`SnapshotEvaluator` is what `train.run_training(evaluator=...)` calls at every snapshot,
on every rank of the job (the ranks share the grid batches as `fid calc` does): it scores the
network with the fixed seeds 0..N−1, `fid calc`'s defaults for everything it does not name
(batch grid, shard size, sampler, numerics; ``compile=False`` for short jobs on a GPU), so

* an evaluation gives the bits `fid calc --network <that snapshot> --num-images N --ref REF
  --features F --metrics M --steps S --batch B` gives on the same device (FID/FDD exactly;
  KID's and precision/recall's torch-fidelity code is deterministic for the same rows);
* successive evaluations differ only by the weights, and a resumed run repeats them exactly
  (its EMA weights are the uninterrupted run's);
* the numbers do not depend on the number of ranks (calc.py: identical by construction).

The reference is checked when the evaluator is built (its dimension against the feature space,
the arrays the metrics need), the feature network is built at the first evaluation on the
network's device. Metrics: fid, kid, isc, prc (METRICS less fd_dinov2, whose 300M-parameter
detector is better run afterwards with `fid sweep --kind checkpoints`).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from pfgmpp_fast.evaluation.calc import GeneratorSource, calc_stats
from pfgmpp_fast.evaluation.digits_features import DigitsFeatures
from pfgmpp_fast.evaluation.features import FEATURES, Detectors, InceptionFeatures, get_feature_extractor
from pfgmpp_fast.evaluation.generate import DEFAULT_STEPS, make_generator_fast
from pfgmpp_fast.evaluation.metrics import METRICS, compute_metrics, load_reference, parse_metrics
from pfgmpp_fast.utils.cli_errors import InvalidValue, MissingFile

__all__ = ["EVAL_METRICS", "FEATURE_DIMS", "SnapshotEvaluator"]

EVAL_METRICS = tuple(m for m in METRICS if m != "fd_dinov2")
FEATURE_DIMS = {"inception": InceptionFeatures.dim, "digits": DigitsFeatures.dim}


class SnapshotEvaluator:
    """``evaluator(net) -> {result column: value}`` (FID or FDD, KID, KID_std, IS, IS_std,
    precision_<space>, recall_<space>: `fid calc`'s names) of ``num_images`` images from seeds
    0..num_images−1. Arguments are checked here; errors name them (InvalidValue, MissingFile)."""

    def __init__(
        self,
        ref: str,
        metrics="fid",
        num_images: int = 10000,
        features: str = "inception",
        num_steps: int = DEFAULT_STEPS,
        batch: int = 64,
        inception_weights: Optional[str] = None,
        digits_cache: Optional[str] = None,
        compile: Optional[bool] = None,
    ):
        from pfgmpp_fast.sampler import SamplerOptions

        try:
            self.metrics = parse_metrics(metrics)
        except ValueError:
            self.metrics = ()
        if not self.metrics or not set(self.metrics) <= set(EVAL_METRICS):
            raise InvalidValue(
                "metrics", f"must be a comma-separated subset of {','.join(EVAL_METRICS)}, got {metrics!r}"
            )
        if features not in FEATURES:
            raise InvalidValue("features", f"must be one of {', '.join(FEATURES)}, got {features!r}")
        if "isc" in self.metrics and features != "inception":
            raise InvalidValue("metrics", f"isc (Inception Score) needs the inception features, not {features!r}")
        for name, value, low in (("num_images", num_images, 2), ("num_steps", num_steps, 1), ("batch", batch, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidValue(name, f"must be an integer >= {low}, got {value!r}")
        if inception_weights is not None and not os.path.isfile(inception_weights):
            raise MissingFile("inception_weights", f"no such file {inception_weights}", sep=": ")
        if not os.path.isfile(ref):
            raise MissingFile("ref", f"no such reference statistics file {ref} (make one with `fid ref`)", sep=": ")
        try:
            self.reference = load_reference(ref, dim=FEATURE_DIMS[features], metrics=self.metrics)
        except (ValueError, OSError) as exc:
            raise InvalidValue("ref", f"{exc} (features: {features})", sep=": ") from None
        self.ref, self.features, self.num_images, self.batch = os.path.abspath(ref), features, num_images, batch
        self.options = SamplerOptions(num_steps=num_steps)
        self.inception_weights, self.digits_cache = inception_weights, digits_cache
        self.compile = None if compile is None else bool(compile)  # None: fid calc's (on a GPU)
        self.seeds = np.arange(num_images, dtype=np.int64)
        self._detectors, self._net, self._fast = None, None, None

    def describe(self) -> dict:
        """The settings, JSON-able (training_options.json)."""
        return {
            "metrics": list(self.metrics),
            "images": self.num_images,
            "seeds": f"0-{self.num_images - 1}",
            "ref": self.ref,
            "features": self.features,
            "steps": self.options.num_steps,
            "batch": self.batch,
            "compile": "auto" if self.compile is None else self.compile,
        }

    @torch.no_grad()
    def __call__(self, net) -> dict:
        device = next(net.parameters()).device
        if self._net is not net:  # one fast view per network: it shares (and follows) its weights
            self._net, self._fast = net, make_generator_fast(net, device, compile=self.compile)
        if self._detectors is None:
            main = get_feature_extractor(self.features, device, self.inception_weights, digits_cache=self.digits_cache)
            self._detectors = Detectors(main, self.metrics)
        source = GeneratorSource(self._fast, self.seeds, device=device, options=self.options)
        stats = calc_stats(source, self._detectors, num=self.num_images, batch_size=self.batch, device=device)
        return compute_metrics(stats, self.reference, self.metrics, self._detectors.name)
