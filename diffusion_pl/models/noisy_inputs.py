"""NoisyInputs: a module that learns on x_t ~ q(x_t | x0) of an optional forward process (the noisy classifier of
classifier guidance, Dhariwal & Nichol 2021, Sec. 4.1; GLIDE's noised CLIP, Nichol et al. 2022, Sec. 4), scores its
predictions per noise level, and keeps the process's marginals in its checkpoints."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric

from diffusion_pl.guidance import PROCESS_MARGINALS_KEY
from diffusion_pl.processes.base import ForwardProcess

log = logging.getLogger(__name__)


class NoisyInput(NamedTuple):
    """What the net sees: the images (noisy x_t when a process is set), the time it embeds, and the noise level.

    Attributes:
        x: Images (B, C, H, W).
        t: Network time ``process.net_input_time(t)`` (B,), or None for clean images.
        noise_fraction: sigma(t)^2 / (alpha(t)^2 + sigma(t)^2) in [0, 1] (B,), or None for clean images.
    """

    x: Tensor
    t: Tensor | None
    noise_fraction: Tensor | None


def noised_input(x0: Tensor, process: ForwardProcess | None, generator: torch.Generator | None) -> NoisyInput:
    """x0 itself (no process), or x_t ~ q(x_t | x0) (Ho et al. 2020, eq. 4) with t ~ ``process.sample_t``, its network
    time and noise fraction sigma^2 / (alpha^2 + sigma^2)."""
    if process is None:
        return NoisyInput(x0, None, None)
    t = process.sample_t(x0.shape[0], x0.device, generator=generator)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    alpha2, sigma2 = process.alpha(t) ** 2, process.sigma(t) ** 2
    return NoisyInput(process.add_noise(x0, t, noise), process.net_input_time(t), sigma2 / (alpha2 + sigma2))


class BucketAccuracy(Metric):
    """Accuracy in ``num_buckets`` equal-width buckets of the noise fraction in [0, 1] (summed over DDP ranks).

    Every rank updates every bucket each step (possibly with zero counts), so the sync is collective-safe.
    """

    full_state_update = False

    def __init__(self, num_buckets: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.add_state("correct", torch.zeros(num_buckets, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_buckets, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: Tensor, noise_fraction: Tensor) -> None:
        """Count ``correct`` (bool, (B,)) predictions in the bucket of each sample's ``noise_fraction`` (B,)."""
        bucket = (noise_fraction * self.num_buckets).long().clamp(0, self.num_buckets - 1)
        self.correct += torch.bincount(bucket[correct], minlength=self.num_buckets)
        self.total += torch.bincount(bucket, minlength=self.num_buckets)

    def compute(self) -> Tensor:
        """Accuracy per bucket; NaN for a bucket without samples."""
        return self.correct.double() / self.total.double()

    def take(self, name: str) -> dict[str, Tensor]:
        """``{name}_{k}``: the accuracy of each bucket k that has samples; then reset for the next evaluation."""
        values = self.compute()
        self.reset()
        return {f"{name}_{k}": v for k, v in enumerate(values.float()) if not v.isnan()}


class NoisyInputs:
    """Mixin of a :class:`~diffusion_pl.models.base.PartsModule` trained on the x_t of an optional ``process``.

    Evaluation logs ``{stage}/{BUCKET_METRIC}_{k}``, the accuracy in the k-th of ``noise_buckets`` equal-width
    buckets of the noise fraction; checkpoints keep the process's marginals, so a guided sampler can check that it
    uses the process the net was trained on.
    """

    #: The logged name of the per-noise-level accuracy, e.g. "acc_noise".
    BUCKET_METRIC: ClassVar[str]

    def init_noisy_inputs(self, process: ForwardProcess | None, noise_buckets: int, time_conditional: bool) -> None:
        """Set the process, the per-level accuracy of validation and test, and the marginals to checkpoint."""
        if noise_buckets < 1:
            raise ValueError(f"noise_buckets must be >= 1, got {noise_buckets}")
        if process is not None and not time_conditional:
            log.warning("training on noisy x_t with a net that does not embed t (time_conditional=False): set "
                        "time_conditional: true in the net's init_args")
        self.process = process
        self.bucket_accuracy = None if process is None else torch.nn.ModuleDict(
            {f"{stage}_acc": BucketAccuracy(noise_buckets) for stage in ("val", "test")})
        self.process_marginals: dict[str, Tensor] | None = None if process is None else process.marginals()

    def noisy_input(self, x0: Tensor, generator: torch.Generator | None = None) -> NoisyInput:
        """The net's input for clean images ``x0`` (:func:`noised_input` of the module's process)."""
        return noised_input(x0, self.process, generator)

    def count_correct(self, stage: str, correct: Tensor, noise_fraction: Tensor | None) -> None:
        """Add an evaluation batch's correct predictions to its noise-level buckets (no-op for clean inputs)."""
        if self.bucket_accuracy is not None and stage != "train":
            self.bucket_accuracy[f"{stage}_acc"].update(correct, noise_fraction)

    def _log_buckets(self, stage: str) -> None:
        """Log (and reset) the per-noise-level accuracy of ``stage``; buckets without samples are skipped."""
        if self.bucket_accuracy is not None:
            self.log_dict(self.bucket_accuracy[f"{stage}_acc"].take(f"{stage}/{self.BUCKET_METRIC}"),  # type: ignore[attr-defined]
                          sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_buckets("val")

    def on_test_epoch_end(self) -> None:
        self._log_buckets("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]  # refuses non-finite weights
        if self.process_marginals is not None:
            checkpoint[PROCESS_MARGINALS_KEY] = self.process_marginals

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]  # refuses another net's or process's checkpoint
        if PROCESS_MARGINALS_KEY in checkpoint:  # on the CPU whatever map_location put them on
            self.process_marginals = {k: v.cpu() for k, v in checkpoint[PROCESS_MARGINALS_KEY].items()}
