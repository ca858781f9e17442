"""DiffusionModule: wires a network, a forward process, a loss, a sampler, a conditioner, guidance and a first stage."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from diffusion_pl.conditioning import Conditioner
from diffusion_pl.core.seeds import predict_seed
from diffusion_pl.core.spec import build, spec_of
from diffusion_pl.core.tensors import to_uint8
from diffusion_pl.data import calibration_batches
from diffusion_pl.guidance import Guidance
from diffusion_pl.likelihood import Likelihood
from diffusion_pl.losses import DenoisingLoss, SimpleLoss
from diffusion_pl.models.base import PartsModule
from diffusion_pl.models.checkpointing import non_finite_error
from diffusion_pl.nets.first_stage import FirstStage, IdentityStage
from diffusion_pl.parameterization import (
    DenoiseFn,
    Denoiser,
    Eps,
    Parameterization,
    clip_denoised,
    from_prediction_kind,
    warn_unclipped_eps,
)
from diffusion_pl.pipelines import PredictTask, seeded_noise
from diffusion_pl.processes.base import ForwardProcess
from diffusion_pl.samplers import DDPM, OnStepFn, Sampler

log = logging.getLogger(__name__)

PredictionKind = Literal["eps", "x0", "v"]

#: The injected parts; a checkpoint stores each as a spec, so ``load_from_checkpoint`` rebuilds them.
PARTS = ("net", "process", "sampler", "loss", "parameterization", "conditioner", "guidance", "first_stage", "likelihood",
         "predict_task")


def resolve_parameterization(part: Parameterization | None, prediction: PredictionKind | None,
                             learned_variance: bool | None) -> Parameterization:
    """The parameterization part, from ``part`` or from earlier configs' ``prediction`` / ``learned_variance``."""
    if prediction is None and not learned_variance:
        return part if part is not None else Eps()
    if part is not None:
        raise ValueError("give the model's parameterization part or the earlier prediction / learned_variance "
                         "arguments, not both: e.g. parameterization: {class_path: diffusion_pl.parameterization.V}")
    mapped = from_prediction_kind(prediction or "eps", bool(learned_variance))
    log.info("prediction: %s, learned_variance: %s is written parameterization: %s now", prediction or "eps",
             bool(learned_variance), spec_of(mapped))
    return mapped


def default_adam(params: Any) -> torch.optim.Optimizer:
    """Adam with lr 2e-4 (Ho et al. 2020, App. B)."""
    return torch.optim.Adam(params, lr=2e-4)


class DiffusionModule(PartsModule):
    """A denoising diffusion model (Ho et al. 2020) of any family, from injected parts.

    Args:
        net: The network, called as ``net(x_t, t_embed, **conditioner(batch))``.
        process: The forward process (``DiscreteProcess``, ``VPSDE``, ``SubVPSDE``, ``VESDE``).
        sampler: The sampler of ``sample``/``predict``/grids/FID, e.g. ``DDIM(steps=50)`` (default: ancestral DDPM).
        loss: Training loss (default: L_simple, Ho et al. 2020 eq. 14).
        parameterization: What the network outputs (default ``Eps()``; ``X0``, ``V``, ``Velocity``, ``EDM``,
            ``LearnedVariance(inner)`` with a net of ``learn_sigma: true``).
        prediction: Earlier configs' "eps", "x0" or "v": mapped to ``Eps()``, ``X0()``, ``V()``.
        learned_variance: Earlier configs' flag: wraps the prediction's part in ``LearnedVariance``.
        conditioner: Turns batches into the net's conditioning (e.g. ``ClassLabel``); None: unconditional.
        guidance: Guidance parts applied in order at sampling (``ClassifierFree``, ``Classifier``).
        first_stage: The frozen map to the space the model runs in (default: pixels; ``Autoencoder``: latent diffusion,
            its latent scale estimated from the training images of all processes when fitting starts).
        likelihood: The likelihood metrics of validation/test (default: the full bound at test, discrete only).
        predict_task: What ``predict`` does with input images (``Inpaint``, ``Interpolate``); None: sample.
        optimizer: Optimizer factory (default: Adam, lr 2e-4).
        lr_scheduler: Learning-rate schedule factory, e.g. ``WarmupLR`` (default: constant).
        image_size: Side of the square images (linked from the data config).
        channels: Image channels (linked from the data config).
        clip_samples: Clamp the predicted x0 to [-1, 1] at every sampling step (pixel space only).

    Checkpoints (:class:`~diffusion_pl.models.checkpointing.CheckpointChecks`): none is written with non-finite
    weights, and one loaded into the module must agree with it in ``MUST_MATCH``.
    """

    #: What the weights mean; the sampler, guidance, likelihood, loss and optimizer may differ from the checkpoint.
    MUST_MATCH = ("net", "process", "parameterization", "first_stage", "conditioner", "image_size", "channels")
    RUN_METRICS = ("val/loss", "val/bpd", "val/fid", "val/kid")

    def __init__(
        self,
        net: nn.Module,
        process: ForwardProcess,
        sampler: Sampler | None = None,
        loss: DenoisingLoss | None = None,
        parameterization: Parameterization | None = None,
        prediction: PredictionKind | None = None,
        learned_variance: bool | None = None,
        conditioner: Conditioner | None = None,
        guidance: Sequence[Guidance] = (),
        first_stage: FirstStage | None = None,
        likelihood: Likelihood | None = None,
        predict_task: PredictTask | None = None,
        optimizer: OptimizerCallable = default_adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        image_size: int = 32,
        channels: int = 3,
        clip_samples: bool = True,
    ) -> None:
        super().__init__()
        net, process, sampler, loss, parameterization, conditioner, guidance, first_stage, likelihood, predict_task = (
            build(part, "DiffusionModule checkpoint") for part in
            (net, process, sampler, loss, parameterization, conditioner, guidance, first_stage, likelihood,
             predict_task))
        parameterization = resolve_parameterization(parameterization, prediction, learned_variance)
        prediction = learned_variance = None  # recorded as the part  # noqa: F841
        self.denoiser = Denoiser(net, process, parameterization)
        self.sampler = sampler if sampler is not None else DDPM()
        self.loss_fn = loss if loss is not None else SimpleLoss()
        self.conditioner = conditioner
        self.guidance = list(guidance)
        self.first_stage = (first_stage if first_stage is not None else IdentityStage()).requires_grad_(False)
        self.likelihood = likelihood if likelihood is not None else Likelihood()
        self.predict_task = predict_task
        self.sampler.check(process)
        self.likelihood.check(process)
        if parameterization.divides_by_alpha and not self.first_stage.clips_to_data_range:
            warn_unclipped_eps(process)
        if conditioner is not None:
            conditioner.check_net(net)
        self.register_parts(dict(zip(PARTS, (net, process, self.sampler, self.loss_fn, parameterization, conditioner,
                                             self.guidance, self.first_stage, self.likelihood, predict_task))),
                            optimizer, lr_scheduler)

    @staticmethod
    def upgraded_hyperparameters(stored: Mapping[str, Any]) -> Mapping[str, Any]:
        """Earlier checkpoints' ``prediction`` and ``learned_variance`` as the ``parameterization`` part's spec."""
        if stored.get("parameterization") is not None or stored.get("prediction") is None:
            return stored
        part = from_prediction_kind(stored["prediction"], bool(stored.get("learned_variance")))
        return {**{k: v for k, v in stored.items() if k not in ("prediction", "learned_variance")},
                "parameterization": spec_of(part)}

    @property
    def trained(self) -> nn.Module:
        return self.denoiser

    @property
    def process(self) -> ForwardProcess:
        return self.denoiser.process

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The shape the model samples: the first stage's latent of a (channels, image_size, image_size) image."""
        hp = self.hparams
        return self.first_stage.latent_shape((hp.channels, hp.image_size, hp.image_size))

    def condition(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The net's conditioning keyword arguments for ``batch`` (condition dropout while training)."""
        return {} if self.conditioner is None else self.conditioner(batch, training=self.training)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        with torch.no_grad():
            latents = self.first_stage.encode(batch["image"])
        loss = self.loss_fn(self.denoiser, latents, **self.condition(batch)).mean()
        self._check_finite(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=latents.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def _evaluate(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        """Log ``<stage>/loss`` and the likelihood metrics. Noise comes from a generator seeded by (batch, rank):
        comparable across evaluations, and the global RNG is untouched (exact resume)."""
        seed = self.evaluation_seed(batch_idx)
        generator = self.evaluation_generator(batch_idx)
        latents, cond = self.first_stage.encode(batch["image"]), self.condition(batch)
        metrics = {"loss": self.loss_fn(self.denoiser, latents, generator=generator, **cond).mean()}
        metrics.update(self.likelihood.metrics(stage, self.denoiser, cond, latents, generator, seed))
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, sync_dist=True, batch_size=latents.shape[0])

    def _check_finite(self, loss: Tensor) -> None:
        """Fail fast on a NaN/inf loss, checked at logging steps only (a host sync every step would slow GPUs);
        checkpoints check every weight before they are written (``CheckpointChecks``)."""
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0 and not torch.isfinite(loss):
            raise non_finite_error(f"training loss is {loss.item()}", self.global_step)

    # ------------------------------------------------------------------ the sampling protocol of callbacks

    @property
    def condition_keys(self) -> tuple[str, ...]:
        """The batch entries that condition or guide samples (predict writes them beside the images)."""
        parts = ([self.conditioner] if self.conditioner is not None else []) + self.guidance
        return tuple(dict.fromkeys(key for part in parts for key in part.batch_keys))

    def example_batch(self, num_samples: int, real: Tensor | None = None) -> dict[str, Tensor]:
        """Balanced conditions for ``num_samples`` samples (grids, FID): e.g. labels cycling through the classes, or
        the low-res versions of ``real`` images of the data."""
        batch: dict[str, Tensor] = {}
        if self.conditioner is not None:
            batch.update(self.conditioner.example_batch(num_samples, self.device, real))
        for part in self.guidance:
            part.prepare(self.process, self.device)
            batch.update(part.example_batch(num_samples, self.device))
        return batch

    def sampling_denoiser(self, process: ForwardProcess, batch: dict[str, Any],
                          generator: torch.Generator | None = None) -> DenoiseFn:
        """The denoiser the sampler calls: conditioned on ``batch`` (any randomness of the condition, e.g. a low-res
        image's augmentation, from ``generator``), wrapped by each guidance part in order, then x0 clipped to the
        data range (pixel space)."""
        cond = {} if self.conditioner is None else self.conditioner(batch, training=False, generator=generator)
        null = {} if not cond else self.conditioner.null(cond)
        denoise: DenoiseFn = self.denoiser.with_process(process).bind(**cond)
        for part in self.guidance:
            part.prepare(self.process, self.device)
            denoise = part.wrap(denoise, batch=batch, cond=cond, null=null, process=process)
        clip = self.hparams.clip_samples and self.first_stage.clips_to_data_range
        return clip_denoised(denoise, process) if clip else denoise

    @torch.no_grad()
    def sample(self, num_samples: int | None = None, *, batch: dict[str, Any] | None = None,
               noise: Tensor | None = None, generator: torch.Generator | None = None,
               progress: bool = False, on_step: OnStepFn | None = None) -> Tensor:
        """Images in [-1, 1] from ``noise`` (or fresh prior noise), conditioned and guided by ``batch``; ``on_step``
        observes each step of the sampler in the space it samples (latents for latent diffusion)."""
        if noise is None:
            if num_samples is None:
                raise ValueError("sample() needs num_samples or noise")
            noise = self.process.prior_sample((num_samples, *self.latent_shape), generator=generator,
                                              device=self.device)
        process = self.sampler.sampling_process(self.process)
        latents = self.sampler.sample(self.sampling_denoiser(process, batch or {}, generator), process, noise,
                                      generator=generator, progress=progress, on_step=on_step)
        return self.first_stage.decode(latents)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """One uint8 image (B, C, H, W, on the CPU) per seed of ``batch["seed"]``, under ``"samples"``, with the
        batch's conditions (e.g. ``"label"``) beside them; or what the ``predict_task`` makes of the batch.

        Each image's prior noise comes from its own seed on the CPU, so with a deterministic sampler (DDIM, ODE) an
        image depends only on its seed, not on the batch size, the device count or the device type; a stochastic
        sampler's step noise comes from a generator seeded by the batch's first seed.
        """
        seeds = batch["seed"].tolist()
        generator = torch.Generator(device=self.device).manual_seed(predict_seed(int(seeds[0])))
        if self.predict_task is not None:
            return self.predict_task(self, batch, generator)
        noise = seeded_noise(self.process, self.latent_shape, seeds).to(self.device)
        images = to_uint8(self.sample(noise=noise, batch=batch, generator=generator)).cpu()
        return {"samples": images, **{key: batch[key].cpu() if isinstance(batch[key], Tensor) else batch[key]
                                      for key in self.condition_keys if key in batch}}

    def on_fit_start(self) -> None:
        """Log the hyperparameters that define the run, beside its metrics (TensorBoard HPARAMS); let the first stage
        estimate what it needs from the training images of all processes (a latent scale, unless resumed)."""
        super().on_fit_start()
        num_images = self.first_stage.calibration_images
        if num_images:
            batches = calibration_batches(self.trainer.datamodule, num_images)
            self.first_stage.calibrate(batches, lambda sums: self.trainer.strategy.reduce(sums, reduce_op="sum"))
