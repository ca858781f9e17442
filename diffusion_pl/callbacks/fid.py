"""FID / KID (/ IS) of EMA samples during training and under ``test``, on every DDP rank."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from diffusion_pl.callbacks.ema import averaged_module
from diffusion_pl.callbacks.examples import real_examples
from diffusion_pl.core.seeds import derived_seed
from diffusion_pl.core.spec import describe
from diffusion_pl.data import ImageDataModule, ImageDataset, Images
from diffusion_pl.metrics.extractor import FeatureExtractor, Features
from diffusion_pl.metrics.generative import GenerativeMetrics, empty_features
from diffusion_pl.metrics.reference import (
    ReferenceStatistics,
    cached_reference,
    default_cache_dir,
    reference_statistics,
)
from diffusion_pl.models.hparams import flatten

log = logging.getLogger(__name__)

# Seed of the real-image subsets (reference_size, KID features): fixed, so cached statistics do not depend on `seed`.
_REFERENCE_SEED = 0


def rank_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """The sampling batches ``[start, stop)`` of ``rank``: global batches of ``batch_size`` consecutive sample
    indices, dealt to ranks in contiguous runs. Batch boundaries do not depend on the world size."""
    starts = list(range(0, num_samples, batch_size))
    lo, hi = len(starts) * rank // world_size, len(starts) * (rank + 1) // world_size
    return [(start, min(start + batch_size, num_samples)) for start in starts[lo:hi]]


def batch_seed(seed: int, start: int) -> int:
    """Seed of the sampling batch whose first sample has index ``start``."""
    return derived_seed(seed, start)


def sample_conditions(module: pl.LightningModule, start: int, stop: int,
                      real: Tensor | None = None) -> dict[str, Tensor]:
    """Conditions of samples ``start .. stop - 1``: the model's own balanced ``example_batch`` (as in the sample
    grids, e.g. labels cycling through the classes, or the low-res versions of the ``real`` example images), so a
    sample's condition does not depend on the batching."""
    return {key: value[start:] for key, value in module.example_batch(stop, real=real).items()}


@dataclass
class EvaluationTiming:
    """Wall-clock seconds of one evaluation on this rank.

    Attributes:
        sampling: Generating the images.
        features: Extracting their features.
        metrics: Syncing and computing the metrics.
    """

    sampling: float = 0.0
    features: float = 0.0
    metrics: float = 0.0


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings are attributed to the right phase."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FID(pl.Callback):
    """FID and KID (and the Inception Score with the Inception extractor) of the EMA model's samples.

    ``num_samples`` images are generated with the model's ``sample(n, generator=...)`` (so with its configured
    sampler and steps, e.g. ``--model.init_args.sampler=DDIM --model.init_args.sampler.steps=50``; class-balanced
    ``labels`` for conditional or guided models) and the EMA weights while fitting. Batches are global
    ``[start, start + batch_size)`` index ranges, dealt to the DDP ranks in contiguous runs, and each batch's
    generator is seeded from ``(seed, start)``: the images, hence the metrics, do not depend on the number of
    processes. Every rank extracts features of its own images and the torchmetrics states are synced, so all
    ranks take part and get the same result.

    The real side (:class:`~diffusion_pl.metrics.reference.ReferenceStatistics` of the datamodule's
    ``reference_split`` at its image size) is computed once by global rank 0 and cached in ``cache_dir``
    under a key of the data settings and the extractor's weight fingerprint; later evaluations and runs
    reuse it. Only rank 0 loads it (see :class:`~diffusion_pl.metrics.generative.GenerativeMetrics`).

    Logged: ``val/fid``, ``val/kid``, ``val/kid_std`` (+ ``val/is``, ``val/is_std``) while fitting or validating,
    ``test/...`` under ``test``; ``test`` also writes every ``test/`` metric with the evaluation settings to
    ``<checkpoint stem>.metrics.json`` next to ``--ckpt_path`` (or ``metrics.json`` in the log dir).
    Nothing runs under ``fast_dev_run``.

    FID is biased upward at small N (about FID_inf + c / N, c depending on the model; Chong & Forsyth 2020): these
    ``num_samples``-image numbers compare checkpoints of one configuration, not with the 50k protocol of published
    tables (50,000 samples against the training set in Inception features). For that, ``predict`` 50,000 samples and
    score them with ``diffusion-pl-eval --inception`` (:mod:`diffusion_pl.metrics.evaluation`), whose ``--floor``
    also gives the FID of as many real images.

    Args:
        extractor: Builds the feature extractor (called once per process at setup), e.g. ``class_path:
            diffusion_pl.metrics.InceptionFeatures`` or ``diffusion_pl.metrics.ClassifierFeatures`` with its
            ``init_args``.
        num_samples: Generated images per evaluation (all ranks together).
        batch_size: Images per sampling batch.
        every_n_steps: Evaluate every N optimizer steps while fitting (logged straight to the loggers); 0
            evaluates at the end of every validation run instead (logged with ``self.log``, so checkpoints can
            monitor ``val/fid``).
        seed: Seed of the generated images and of KID's/IS's random subsets (the real subsets are fixed).
        reference_split: Real split of the datamodule's source the samples are compared with.
        reference_size: Real images in the reference (a fixed random subset); None uses the whole split.
        kid_reference_size: Real images whose features are kept for KID.
        kid_subsets: Random subsets KID averages over.
        kid_subset_size: Images per KID subset (capped by the real and generated counts).
        cache_dir: Folder of cached reference statistics; default ``$DIFFUSION_PL_CACHE/fid`` or
            ``~/.cache/diffusion_pl/fid``.
    """

    def __init__(
        self,
        extractor: Callable[[], FeatureExtractor],
        num_samples: int = 10000,
        batch_size: int = 250,
        every_n_steps: int = 0,
        seed: int = 0,
        reference_split: Literal["train", "test"] = "train",
        reference_size: int | None = None,
        kid_reference_size: int = 10000,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        cache_dir: str | None = None,
    ) -> None:
        if num_samples < 2 or batch_size < 1 or every_n_steps < 0:
            raise ValueError(f"FID needs num_samples >= 2, batch_size >= 1, every_n_steps >= 0; got {num_samples}, "
                             f"{batch_size}, {every_n_steps}")
        self.extractor_factory = extractor
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.reference_split = reference_split
        self.reference_size = reference_size
        self.kid_reference_size = kid_reference_size
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.extractor: FeatureExtractor | None = None
        self.metrics: GenerativeMetrics | None = None
        self.reference_key: dict[str, Any] | None = None
        self.last_timing = EvaluationTiming()
        self._last_step = 0

    # ------------------------------------------------------------------------------------------- hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Build the extractor for fit/validate/test (failing fast, e.g. on missing Inception weights), except
        under fast_dev_run."""
        if trainer.fast_dev_run:
            log.info("FID is skipped under fast_dev_run")
        elif stage in ("fit", "validate", "test") and self.extractor is None:
            self.extractor = self.extractor_factory()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        due = self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._last_step
        if due and not trainer.fast_dev_run:
            self._last_step = step  # with gradient accumulation several batches end at the same step
            values = self._prefixed("val", self.evaluate(trainer, pl_module))
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps == 0 and not trainer.sanity_checking and not trainer.fast_dev_run:
            pl_module.log_dict(self._prefixed("val", self.evaluate(trainer, pl_module)), sync_dist=True)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.fast_dev_run:
            pl_module.log_dict(self._prefixed("test", self.evaluate(trainer, pl_module)), sync_dist=True)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.fast_dev_run:
            path = self.write_test_report(trainer, pl_module)
            log.info("test metrics written to %s", path)

    # ------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Generate ``num_samples`` images over all ranks and return the synced metrics (unprefixed names)."""
        module = averaged_module(trainer, pl_module)
        metrics = self._prepare(trainer, module.device)
        was_training = module.training
        module.eval()
        real = real_examples(trainer, self.num_samples)
        generated, timing = self._generate(module, trainer.global_rank, trainer.world_size, real)
        module.train(was_training)
        start = time.perf_counter()
        metrics.update(generated)
        values = metrics.compute(self.seed)
        metrics.reset()
        timing.metrics = time.perf_counter() - start
        self.last_timing = timing
        log.info("FID evaluation at step %d: %s; this rank sampled %.1fs, extracted features %.1fs, metrics %.1fs",
                 trainer.global_step, ", ".join(f"{k}={v:.4g}" for k, v in values.items()), timing.sampling,
                 timing.features, timing.metrics)
        return values

    def _generate(self, module: pl.LightningModule, rank: int, world_size: int,
                  real: Tensor | None = None) -> tuple[Features, EvaluationTiming]:
        """Sample this rank's batches (conditions made from the ``real`` example images where the model needs data)
        and extract their features, timing both phases."""
        assert self.extractor is not None
        timing = EvaluationTiming()
        device = module.device
        features: list[Tensor] = []
        logits: list[Tensor] = []
        for start, stop in rank_batches(self.num_samples, self.batch_size, rank, world_size):
            began = time.perf_counter()
            generator = torch.Generator(device=device).manual_seed(batch_seed(self.seed, start))
            images = module.sample(stop - start, batch=sample_conditions(module, start, stop, real),
                                   generator=generator)
            _synchronize(device)
            sampled = time.perf_counter()
            with torch.no_grad():
                out = self.extractor(images)
            _synchronize(device)
            timing.sampling += sampled - began
            timing.features += time.perf_counter() - sampled
            features.append(out.features)
            if out.logits is not None:
                logits.append(out.logits)
        if not features:
            return empty_features(self.extractor.num_features, self.extractor.num_logits, device), timing
        return Features(torch.cat(features), torch.cat(logits) if logits else None), timing

    def _prepare(self, trainer: pl.Trainer, device: torch.device) -> GenerativeMetrics:
        """On first use: move the extractor to ``device``, load (rank 0) the reference and build the metrics."""
        if self.extractor is None:
            self.extractor = self.extractor_factory()
        self.extractor.to(device)
        if self.metrics is not None:
            return self.metrics.to(device)
        datamodule = trainer.datamodule
        if not isinstance(datamodule, ImageDataModule):
            raise TypeError("the FID callback reads its reference images through the ImageDataModule; "
                            f"got datamodule {type(datamodule).__name__}")
        self.reference_key = self._reference_key(datamodule)
        stats = self._reference(datamodule, device) if trainer.is_global_zero else None
        num_kid_reference = trainer.strategy.broadcast(None if stats is None else len(stats.kid_features), src=0)
        subset_size = min(self.kid_subset_size, self.num_samples, num_kid_reference)
        self.metrics = GenerativeMetrics(self.extractor.num_features, self.extractor.num_logits,
                                         kid_subsets=self.kid_subsets, kid_subset_size=subset_size).to(device)
        self.metrics.load_reference(stats)
        return self.metrics

    def _reference_key(self, datamodule: ImageDataModule) -> dict[str, Any]:
        """Everything the reference statistics depend on."""
        assert self.extractor is not None
        return {"source": datamodule.source.identity(), "split": self.reference_split,
                "image_format": asdict(datamodule.image_format), "reference_size": self.reference_size,
                "kid_reference_size": self.kid_reference_size, "extractor": self.extractor.name,
                "extractor_fingerprint": self.extractor.fingerprint()}

    def _reference(self, datamodule: ImageDataModule, device: torch.device) -> ReferenceStatistics:
        """The cached reference statistics, computed from the real images on a cache miss."""
        assert self.extractor is not None and self.reference_key is not None
        extractor = self.extractor

        def compute() -> ReferenceStatistics:
            data = self._reference_data(datamodule)
            log.info("computing reference statistics of %d %s images", len(data), self.reference_split)
            return reference_statistics(self._real_batches(data, device), extractor, len(data),
                                        self.kid_reference_size, seed=_REFERENCE_SEED)

        return cached_reference(self.cache_dir, self.reference_key, compute)

    def _reference_data(self, datamodule: ImageDataModule) -> Images:
        """The real split (or its fixed random subset of ``reference_size`` images) at the datamodule's format."""
        data = datamodule.load(self.reference_split)
        if data is None:
            raise ValueError(f"{describe(datamodule.source.identity())} has no {self.reference_split!r} split: set the "
                             "FID callback's reference_split='train'")
        if self.reference_size is not None and self.reference_size < len(data):
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(_REFERENCE_SEED))
            data = data.subset(order[: self.reference_size].sort().values)
        return data

    def _real_batches(self, data: Images, device: torch.device) -> Iterator[Tensor]:
        """Real images in [-1, 1] (the datamodule's own conversion), in order. The loader's own generator keeps
        the global RNG untouched."""
        loader = DataLoader(ImageDataset(data), batch_size=self.batch_size, shuffle=False,
                            generator=torch.Generator())
        for batch in loader:
            yield batch["image"].to(device)

    # ------------------------------------------------------------------------------------------- reporting

    @staticmethod
    def _prefixed(stage: str, values: dict[str, float]) -> dict[str, float]:
        return {f"{stage}/{name}": value for name, value in values.items()}

    def write_test_report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        """Write the ``test/`` metrics and the evaluation settings as JSON next to the tested checkpoint."""
        ckpt_path = trainer.ckpt_path
        if ckpt_path:
            path = Path(ckpt_path).with_suffix(".metrics.json")
        else:
            path = Path(trainer.log_dir or trainer.default_root_dir) / "metrics.json"
        model = flatten({k: v for k, v in pl_module.hparams.items() if not k.startswith("_")}, "")
        report = {
            "checkpoint": None if not ckpt_path else str(Path(ckpt_path).resolve()),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")},
            "model": model,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "world_size": trainer.world_size,
            "reference": self.reference_key,
            "seconds_on_rank_0": vars(self.last_timing),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
        return path
