"""Guidance parts: configured objects that wrap a model's denoiser at sampling time, applied in list order."""

from __future__ import annotations

import abc
import logging
from typing import Any

import torch
from torch import Tensor

from diffusion_pl.core.errors import CheckpointMismatchError
from diffusion_pl.core.spec import Configurable
from diffusion_pl.guidance.classifier import LogProbFn, classifier_guidance
from diffusion_pl.guidance.classifier_free import batched_classifier_free
from diffusion_pl.nets.classifier import EncoderClassifier
from diffusion_pl.nets.loading import load_checkpoint, rebuild
from diffusion_pl.parameterization import ConditionalDenoiseFn, DenoiseFn
from diffusion_pl.processes.base import ForwardProcess, marginals_mismatch

log = logging.getLogger(__name__)

#: Checkpoint entry holding ``ForwardProcess.marginals()`` of the process a noisy classifier was trained on.
PROCESS_MARGINALS_KEY = "process_marginals"


class Guidance(Configurable, abc.ABC):
    """One guidance term. ``wrap`` receives the denoiser built so far and returns the guided one.

    The first part gets the model's conditional denoiser (``denoise(x_t, t, **cond)``); later parts get what the
    previous one returned.
    """

    @abc.abstractmethod
    def wrap(self, denoise: ConditionalDenoiseFn, *, batch: dict[str, Any], cond: dict[str, Tensor],
             null: dict[str, Tensor], process: ForwardProcess) -> DenoiseFn:
        """The guided denoiser for the samples of ``batch`` (conditioned by ``cond``, whose null is ``null``) on
        the sampler's ``process``."""

    def prepare(self, process: ForwardProcess, device: torch.device) -> None:
        """Load what the part needs onto ``device`` and check it against the model's (trained) ``process``."""

    def example_batch(self, num_samples: int, device: torch.device | str) -> dict[str, Tensor]:
        """Batch entries the part targets for ``num_samples`` samples (e.g. cycling class labels)."""
        return {}

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """The batch entries the part reads (predict writes them next to the samples)."""
        return ()



class ClassifierFree(Guidance):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): eps = (1 + w) eps(x_t, c) - w eps(x_t, null), both
    passes in one batched forward. Needs a conditioner trained with condition dropout, and must come first in the
    guidance list (it re-runs the model with the null condition). Without a condition it does nothing.

    Args:
        scale: The guidance weight w (0: the conditional model).
    """

    def __init__(self, scale: float = 3.0) -> None:
        self.scale = scale

    def wrap(self, denoise: ConditionalDenoiseFn, *, batch: dict[str, Any], cond: dict[str, Tensor],
             null: dict[str, Tensor], process: ForwardProcess) -> DenoiseFn:
        if not cond or self.scale == 0:
            return denoise
        return batched_classifier_free(denoise, self.scale, cond, null, process)



class Classifier(Guidance):
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 2): eps - s sigma(t) grad log p(y | x_t) of a classifier
    trained on x_t of the model's own forward process, towards ``batch["label"]``.

    Args:
        checkpoint: A ``ClassifierModule`` checkpoint trained with the model's process (e.g.
            ``configs/guidance/classifier_fashion_mnist.yaml``).
        scale: The guidance scale s.
    """

    def __init__(self, checkpoint: str, scale: float = 1.0) -> None:
        self.checkpoint = checkpoint
        self.scale = scale
        self._net: torch.nn.Module | None = None

    def prepare(self, process: ForwardProcess, device: torch.device) -> None:
        """Load the classifier once (frozen, eval mode) and refuse one trained on another forward process."""
        if self._net is None:
            stored = load_checkpoint(self.checkpoint, what="guidance classifier checkpoint", how_to_make=(
                "train a noisy classifier on this model's process first, e.g. `diffusion-pl fit --config "
                "configs/guidance/classifier_fashion_mnist.yaml` for the Fashion-MNIST models, and point the "
                "Classifier guidance's checkpoint at its last.ckpt"))
            self._check_process(stored.get(PROCESS_MARGINALS_KEY), process)
            with torch.inference_mode(False):  # predict runs in inference mode, and guidance backpropagates
                self._net = rebuild(stored, "net", "net.", self.checkpoint, "ClassifierModule checkpoint",
                                    EncoderClassifier).requires_grad_(False)
        self._net.to(device)

    def _check_process(self, marginals: dict[str, Tensor] | None, process: ForwardProcess) -> None:
        """A classifier read at the wrong noise levels guides wrongly: its process must be the model's."""
        if marginals is None:
            log.warning("classifier checkpoint %s records no forward process (a clean classifier, or one saved by an "
                        "older version): cannot check that it was trained on this model's process", self.checkpoint)
            return
        mismatch = marginals_mismatch(marginals, process.marginals())
        if mismatch is not None:
            raise CheckpointMismatchError(
                f"classifier checkpoint {self.checkpoint} was trained on x_t of another forward process than this "
                f"model's ({mismatch}): train the noisy classifier with model.init_args.process set as in this "
                "model's config (configs/guidance/classifier_fashion_mnist.yaml matches the Fashion-MNIST DDPMs)")

    @property
    def net(self) -> torch.nn.Module:
        if self._net is None:
            raise RuntimeError("Classifier guidance used before prepare(process, device) loaded its classifier")
        return self._net

    @property
    def num_classes(self) -> int:
        return int(self.net.num_classes)

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return ("label",)

    def example_batch(self, num_samples: int, device: torch.device | str) -> dict[str, Tensor]:
        """Target labels cycling through the classifier's classes."""
        return {"label": torch.arange(num_samples, device=device) % self.num_classes}

    def log_prob(self, labels: Tensor, process: ForwardProcess) -> LogProbFn:
        """(x_t, t) -> log p(labels | x_t) of the classifier at the sampler's times."""
        net = self.net

        def log_prob(x_t: Tensor, t: Tensor) -> Tensor:
            logits = net(x_t, process.net_input_time(t)).float()
            # The sampler's labels may be inference tensors (predict); gather saves its index for backward.
            return logits.log_softmax(-1).gather(1, labels[:, None].clone()).squeeze(1)

        return log_prob

    def wrap(self, denoise: ConditionalDenoiseFn, *, batch: dict[str, Any], cond: dict[str, Tensor],
             null: dict[str, Tensor], process: ForwardProcess) -> DenoiseFn:
        if "label" not in batch:
            return denoise
        return classifier_guidance(denoise, self.log_prob(batch["label"], process), process, self.scale)
