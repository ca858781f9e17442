"""DiffusionModule: wires a network, a forward process, a loss and a sampler into Lightning."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from diffusion_pl.guidance import batched_classifier_free, classifier_guidance
from diffusion_pl.likelihood.vlb import nats_to_bits_per_dim, variational_bound
from diffusion_pl.losses import DenoisingLoss, SimpleLoss
from diffusion_pl.models.classifier import ClassifierModule
from diffusion_pl.models.lr_schedule import Decay, warmup_multiplier
from diffusion_pl.parameterization import Denoiser, DenoiseFn, PredictionKind, clip_denoised
from diffusion_pl.processes.base import ForwardProcess, marginals_mismatch
from diffusion_pl.processes.discrete import DiscreteProcess, FixedVariance
from diffusion_pl.likelihood.ode import bits_per_dim, dequantize, ode_log_likelihood
from diffusion_pl.processes.sde import SDEProcess
from diffusion_pl.samplers import (
    sample_ddim,
    sample_ddpm,
    sample_euler_maruyama,
    sample_ode,
    sample_pc,
    strided_steps,
)
from diffusion_pl.utils import to_uint8

SamplerName = Literal["ddpm", "ddim", "euler_maruyama", "pc", "ode"]
DISCRETE_SAMPLERS = ("ddpm", "ddim")
SDE_SAMPLERS = ("euler_maruyama", "pc", "ode")
log = logging.getLogger(__name__)


def check_sampler(sampler: str, process: ForwardProcess) -> None:
    """Fail early when the sampler cannot run on the process (ancestral/DDIM need discrete steps, the SDE
    samplers an SDE)."""
    if sampler not in DISCRETE_SAMPLERS + SDE_SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(DISCRETE_SAMPLERS + SDE_SAMPLERS)}")
    discrete = isinstance(process, DiscreteProcess)
    if discrete and sampler in SDE_SAMPLERS:
        raise ValueError(f"sampler {sampler!r} integrates an SDE but the process is discrete (DDPM): use 'ddpm' or "
                         "'ddim', or a VPSDE/SubVPSDE/VESDE process")
    if not discrete and sampler in DISCRETE_SAMPLERS:
        raise ValueError(f"sampler {sampler!r} needs a discrete (DDPM) process; for {type(process).__name__} use "
                         "'euler_maruyama', 'pc' or 'ode'")


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """Adam with lr 2e-4 (Ho et al. 2020, App. B)."""
    return torch.optim.Adam(params, lr=2e-4)


class DiffusionModule(pl.LightningModule):
    """A denoising diffusion model (Ho et al. 2020) trained with a denoising loss and sampled by a sampler function.

    Args:
        net: The network, called as ``net(x_t, t_embed)``.
        process: The forward process.
        prediction: What the network predicts: "eps", "x0" or "v".
        loss: Training loss (defaults to L_simple).
        optimizer: Optimizer factory (defaults to Adam, lr 2e-4).
        warmup_steps: Linear learning-rate warm-up, in optimizer steps.
        lr_decay: "constant" after warm-up, or "cosine" decay to 0 at the trainer's max_steps.
        image_size: Side of the square images (linked from the data config).
        channels: Image channels (linked from the data config).
        learned_variance: The net outputs the reverse-variance interpolation too (improved DDPM; the net
            needs ``learn_sigma: true``).
        sampler: Sampler used by ``sample``/``predict``: "ddpm" (ancestral) or "ddim" for a discrete process;
            "euler_maruyama", "pc" (predictor-corrector) or "ode" (probability flow) for an SDE process.
        sample_steps: Sampling steps: DDIM's strided grid, the respaced DDPM chain (None: all T steps), or the
            SDE/ODE grid (None: the sampler's default).
        sampler_options: Extra keyword arguments of the sampler function, e.g. ``{snr: 0.16, corrector_steps: 1}``
            for "pc" or ``{method: rk45, rtol: 1e-5, atol: 1e-5}`` for "ode".
        eta: DDIM stochasticity in [0, 1].
        ddpm_variance: Fixed reverse variance "beta" or "posterior" (sampling and the bound, when not learned).
        clip_samples: Clamp the predicted x0 to [-1, 1] at every sampling step.
        class_conditional: Train p(x | y): the net gets the labels (its ``num_classes`` must equal the data's),
            replaced by the null label with probability ``label_dropout`` (Ho & Salimans 2022, Alg. 1).
        label_dropout: Probability of dropping the label during training (classifier-free guidance).
        guidance_scale: Classifier-free guidance weight w for sampling, eps = (1 + w) eps(x, y) - w eps(x).
        classifier_checkpoint: A noisy-classifier checkpoint (``ClassifierModule`` trained on this process)
            whose grad log p(y | x_t) guides sampling (Dhariwal & Nichol 2021); None disables it.
        classifier_scale: Classifier guidance scale s.
        val_bpd_terms: Network evaluations per validation batch for the stratified estimate of the variational
            bound logged as ``val/bpd`` (0 disables it).
        test_bpd_terms: Terms of the bound logged as ``test/bpd``; None evaluates all T (the full bound).
            Discrete processes only.
        test_bpd_ode: Also log ``test/bpd_ode``, the probability-flow ODE likelihood of uniformly dequantized
            test images (Song et al. 2021, App. D.2; Hutchinson trace estimator, adaptive RK45).
        likelihood_options: Extra keyword arguments of ``ode_log_likelihood`` (method, rtol, atol, hutchinson,
            num_probes, steps).
    """

    def __init__(
        self,
        net: nn.Module,
        process: DiscreteProcess | SDEProcess,
        prediction: PredictionKind = "eps",
        loss: DenoisingLoss | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        warmup_steps: int = 0,
        lr_decay: Decay = "constant",
        image_size: int = 32,
        channels: int = 3,
        learned_variance: bool = False,
        sampler: SamplerName = "ddpm",
        sample_steps: int | None = None,
        sampler_options: dict[str, Any] | None = None,
        eta: float = 0.0,
        ddpm_variance: FixedVariance = "beta",
        clip_samples: bool = True,
        class_conditional: bool = False,
        label_dropout: float = 0.1,
        guidance_scale: float = 0.0,
        classifier_checkpoint: str | None = None,
        classifier_scale: float = 1.0,
        val_bpd_terms: int = 0,
        test_bpd_terms: int | None = None,
        test_bpd_ode: bool = False,
        likelihood_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "process", "loss"])
        check_sampler(sampler, process)
        if val_bpd_terms and not isinstance(process, DiscreteProcess):
            raise ValueError("val_bpd_terms estimates the discrete variational bound; for an SDE process set it to 0 "
                             "and use test_bpd_ode (probability-flow likelihood)")
        if class_conditional and not getattr(net, "num_classes", None):
            raise ValueError("class_conditional needs a net with a class embedding: set "
                             "model.init_args.net.init_args.num_classes to the number of classes of the data")
        self.denoiser = Denoiser(net, process, prediction, learned_variance)
        self._classifier: list[pl.LightningModule] = []  # loaded lazily; a list keeps it out of state_dict
        self.loss_fn = loss if loss is not None else SimpleLoss()
        self.optimizer_factory = optimizer

    @property
    def process(self) -> ForwardProcess:
        return self.denoiser.process

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.hparams.channels, self.hparams.image_size, self.hparams.image_size)

    @property
    def null_label(self) -> int:
        """The label index meaning "no class" (the net's extra embedding row)."""
        return int(self.denoiser.net.num_classes)

    def conditioning(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments the network receives besides (x_t, t): the labels of a class-conditional model,
        each replaced by the null label with probability ``label_dropout`` while training."""
        if not self.hparams.class_conditional:
            return {}
        labels = batch["label"]
        if self.training and self.hparams.label_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.hparams.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        return {"y": labels}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss_fn(self.denoiser, batch["image"], **self.conditioning(batch)).mean()
        self._check_finite(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val", self.hparams.val_bpd_terms)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        discrete = isinstance(self.process, DiscreteProcess)
        self._evaluate(batch, batch_idx, "test", self.hparams.test_bpd_terms if discrete else 0)
        if self.hparams.test_bpd_ode:
            self.log("test/bpd_ode", self._ode_bits_per_dim(batch, batch_idx), sync_dist=True,
                     batch_size=batch["image"].shape[0])

    def _ode_bits_per_dim(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Mean bits/dim of the batch under the probability-flow ODE (needs autograd, even inside ``test``)."""
        generator = torch.Generator(device=self.device).manual_seed(batch_idx + 1000 * self.global_rank)
        with torch.inference_mode(False), torch.enable_grad():
            images = dequantize(batch["image"].clone(), generator)
            cond = {key: value.clone() for key, value in self.conditioning(batch).items()}
            log_p = ode_log_likelihood(self.denoiser.bind(**cond), self.process, images, generator=generator,
                                       **(self.hparams.likelihood_options or {}))
        return bits_per_dim(-log_p.detach(), images[0].numel()).mean()

    def _evaluate(self, batch: dict[str, Any], batch_idx: int, stage: str, bpd_terms: int | None) -> None:
        """Log ``<stage>/loss`` and, unless ``bpd_terms`` is 0, ``<stage>/bpd`` (the variational bound, estimated
        from ``bpd_terms`` stratified steps or complete when None). Noise and steps come from a generator seeded by
        the batch index: comparable across evaluations, and the global RNG is untouched (exact resume)."""
        generator = torch.Generator(device=self.device).manual_seed(batch_idx + 1000 * self.global_rank)
        images, cond = batch["image"], self.conditioning(batch)
        size = images.shape[0]
        loss = self.loss_fn(self.denoiser, images, generator=generator, **cond).mean()
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=size)
        if bpd_terms != 0:
            nats = variational_bound(self.denoiser.bind(**cond), self.process, images, num_terms=bpd_terms,
                                     fixed_variance=self.hparams.ddpm_variance, generator=generator)
            bpd = nats_to_bits_per_dim(nats, images[0].numel()).mean()
            self.log(f"{stage}/bpd", bpd, sync_dist=True, batch_size=size)

    def _check_finite(self, loss: Tensor) -> None:
        """Fail fast on a NaN/inf loss, checked at logging steps only (a host sync every step would slow GPUs)."""
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0 and not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step}: lower the learning rate "
                "(model.optimizer.init_args.lr), set trainer.gradient_clip_val (e.g. 1.0), add warm-up "
                "(model.warmup_steps), or use bf16-mixed instead of 16-mixed precision")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.parameters())
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        multiplier = functools.partial(warmup_multiplier, warmup_steps=self.hparams.warmup_steps,
                                       decay=self.hparams.lr_decay, total_steps=total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def sampling_denoiser(self, denoiser: Denoiser, labels: Tensor | None = None) -> DenoiseFn:
        """``denoiser`` as the samplers call it: labels bound (with classifier-free guidance when the model is
        class-conditional and ``guidance_scale`` != 0), classifier guidance when a classifier is configured, then
        optional x0 clipping. Without labels a class-conditional model samples unconditionally (null label)."""
        hp = self.hparams
        if hp.class_conditional and labels is not None and hp.guidance_scale != 0:
            null = torch.full_like(labels, self.null_label)
            denoise = batched_classifier_free(denoiser, hp.guidance_scale, {"y": labels}, {"y": null})
        elif hp.class_conditional and labels is not None:
            denoise = denoiser.bind(y=labels)
        else:
            denoise = denoiser.bind()
        if hp.classifier_checkpoint and labels is not None:
            denoise = classifier_guidance(denoise, self._classifier_log_prob(labels, denoiser.process),
                                          denoiser.process, hp.classifier_scale)
        return clip_denoised(denoise, denoiser.process) if hp.clip_samples else denoise

    def guiding_classifier(self) -> ClassifierModule:
        """The noisy classifier of ``classifier_checkpoint``, loaded once (frozen, eval mode)."""
        if not self._classifier:
            if not Path(self.hparams.classifier_checkpoint).is_file():
                raise FileNotFoundError(
                    f"classifier_checkpoint {self.hparams.classifier_checkpoint} not found: train a noisy classifier "
                    "on this model's process first, e.g. `diffusion-pl fit --config "
                    "configs/guidance/classifier_fashion_mnist.yaml` for the Fashion-MNIST demo, and point "
                    "model.init_args.classifier_checkpoint at its last.ckpt")
            # predict runs in inference mode, and guidance backpropagates; the net's throwaway random init must not
            # draw from the global RNG (sample grids during fit would otherwise change the training noise)
            with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
                classifier = ClassifierModule.load_from_checkpoint(self.hparams.classifier_checkpoint,
                                                                   map_location=self.device, weights_only=False)
            self._check_classifier_process(classifier)
            self._classifier.append(classifier.eval().requires_grad_(False))
        return self._classifier[0]

    def _check_classifier_process(self, classifier: ClassifierModule) -> None:
        """Refuse a guiding classifier trained on x_t of another forward process: its p(y | x_t) would be read at
        the wrong noise levels (Dhariwal & Nichol 2021 train it on the diffusion model's own noising)."""
        path = self.hparams.classifier_checkpoint
        if classifier.process_marginals is None:
            log.warning("classifier_checkpoint %s records no forward process (a clean classifier, or one saved by an "
                        "older version): cannot check that it was trained on this model's process", path)
            return
        mismatch = marginals_mismatch(classifier.process_marginals, self.process.marginals())
        if mismatch is not None:
            raise ValueError(
                f"classifier_checkpoint {path} was trained on x_t of another forward process than this model's "
                f"({mismatch}): train the noisy classifier with model.init_args.process set as in this model's "
                "config (configs/guidance/classifier_fashion_mnist.yaml matches the Fashion-MNIST DDPMs)")

    def _classifier_log_prob(self, labels: Tensor, process: ForwardProcess) -> Callable[[Tensor, Tensor], Tensor]:
        """log p(y | x_t) of the guiding classifier at the sampler's times."""
        net = self.guiding_classifier().net

        def log_prob(x_t: Tensor, t: Tensor) -> Tensor:
            logits = net(x_t, process.net_input_time(t)).float()
            # The sampler's labels may be inference tensors (predict); gather saves its index for backward.
            return logits.log_softmax(-1).gather(1, labels[:, None].clone()).squeeze(1)

        return log_prob

    @torch.no_grad()
    def sample(self, num_samples: int | None = None, *, noise: Tensor | None = None,
               generator: torch.Generator | None = None, progress: bool = False,
               labels: Tensor | None = None) -> Tensor:
        """Generate images in [-1, 1] with the configured sampler, from ``noise`` or fresh prior noise; ``labels``
        are the target classes of a class-conditional or classifier-guided model."""
        if noise is None:
            if num_samples is None:
                raise ValueError("sample() needs num_samples or noise")
            noise = self.process.prior_sample((num_samples, *self.image_shape), generator=generator,
                                              device=self.device)
        hp = self.hparams
        options = {"generator": generator, "progress": progress, **(hp.sampler_options or {})}
        if hp.sampler in SDE_SAMPLERS:
            sampler = {"euler_maruyama": sample_euler_maruyama, "pc": sample_pc, "ode": sample_ode}[hp.sampler]
            steps = {} if hp.sample_steps is None else {"steps": hp.sample_steps}
            return sampler(self.sampling_denoiser(self.denoiser, labels), self.process, noise, **steps, **options)
        steps = hp.sample_steps or self.process.num_steps
        if hp.sampler == "ddim":
            return sample_ddim(self.sampling_denoiser(self.denoiser, labels), self.process, noise, steps=steps,
                               eta=hp.eta, **options)
        process = self.process if steps == self.process.num_steps else self.process.respace(
            strided_steps(self.process.num_steps, steps).tolist())
        denoise = self.sampling_denoiser(self.denoiser.with_process(process), labels)
        return sample_ddpm(denoise, process, noise, variance=hp.ddpm_variance, **options)

    @property
    def guided(self) -> bool:
        """Whether sampling targets labels: a class-conditional model or classifier guidance."""
        return bool(self.hparams.class_conditional or self.hparams.classifier_checkpoint)

    def default_labels(self, num_samples: int) -> Tensor | None:
        """Labels that cycle through the classes for conditional or guided models (sample grids), else None."""
        if not self.guided:
            return None
        num_classes = self.null_label if self.hparams.class_conditional else self.guiding_classifier().net.num_classes
        return torch.arange(num_samples, device=self.device) % num_classes

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Sample one image per seed in ``batch["seed"]`` (targeting ``batch["label"]`` when the model is
        conditional or guided); returns uint8 images (B, C, H, W) on the CPU.

        Each image's prior noise comes from its own seed on the CPU, so an image depends only on its seed,
        not on the batch size, the device count or the device type.
        """
        seeds = batch["seed"].tolist()
        noise = torch.cat([self.process.prior_sample((1, *self.image_shape), generator=torch.Generator().manual_seed(s))
                           for s in seeds]).to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(int(seeds[0]) * 7919 + 1)
        labels = batch["label"] if self.guided and "label" in batch else None
        return to_uint8(self.sample(noise=noise, generator=generator, labels=labels)).cpu()

    def on_fit_start(self) -> None:
        """Log the effective batch size and learning rate so runs compare (DDP multiplies the batch)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        per_device = getattr(datamodule, "hparams", {}).get("batch_size")
        if per_device is None or self.logger is None or not self.trainer.is_global_zero:
            return
        effective = per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches
        group = self.trainer.optimizers[0].param_groups[0]
        lr = group.get("initial_lr", group["lr"])
        num_parameters = sum(p.numel() for p in self.denoiser.parameters())
        log.info("effective batch size %d (%d per device x %d devices x %d accumulation), base lr %g, %d parameters",
                 effective, per_device, self.trainer.world_size, self.trainer.accumulate_grad_batches, lr,
                 num_parameters)
        self.logger.log_hyperparams({"effective_batch_size": effective, "base_lr": lr,
                                     "num_parameters": num_parameters})
