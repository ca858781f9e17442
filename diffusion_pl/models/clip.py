"""CLIPModule: a small CLIP trained contrastively on the ImageDataModule's images and class captions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from diffusion_pl.core.spec import build, is_spec
from diffusion_pl.models.base import PartsModule
from diffusion_pl.models.noisy_inputs import NoisyInputs
from diffusion_pl.nets.clip import CLASS_NAMES_KEY, CLIPNet
from diffusion_pl.processes.base import ForwardProcess

#: Caption templates filled with a class name (CLIP's prompt engineering, Radford et al. 2021, Sec. 3.1.4).
DEFAULT_TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "a {}")


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW with lr 5e-4 and weight decay 0.1 (Radford et al. 2021, Sec. 2.5 use AdamW with decoupled decay)."""
    return torch.optim.AdamW(params, lr=5e-4, weight_decay=0.1)


def label_aware_contrastive_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Symmetric cross-entropy of CLIP's (B, B) logits tau cos(g_i, h_j) (Radford et al. 2021, Fig. 3) with
    label-aware targets: image i's caption distribution is uniform over the captions j of its class,
    T_ij = 1[y_i = y_j] / #{k: y_k = y_i}, and likewise for texts (T is symmetric):

        L = 1/2 [ -1/B sum_i sum_j T_ij log softmax_j(logits_i.) - 1/B sum_j sum_i T_ji log softmax_i(logits_.j) ].

    With all labels distinct this is CLIP's InfoNCE; with class captions a batch holds many captions of one class,
    which plain InfoNCE would push apart as negatives.
    """
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class CLIPModule(NoisyInputs, PartsModule):
    """Contrastive training of a :class:`CLIPNet` on images and captions made from their class names.

    Each training image gets a caption ``template.format(class name)`` with a template drawn at random from
    ``templates`` (or the batch's own ``"caption"`` when ``templates`` is empty); the loss is
    :func:`label_aware_contrastive_loss`, and the log temperature is clamped at ln 100 after every step.
    Validation logs ``val/loss`` and ``val/clip_acc``, the zero-shot accuracy: the class whose prompt
    ``templates[0].format(name)`` (e.g. "a photo of a sneaker") is most similar to the image.

    With a ``process`` the image encoder learns on x_t = alpha(t) x0 + sigma(t) eps with its time (GLIDE's noised
    CLIP, Nichol et al. 2022, Sec. 4; the net needs ``time_conditional: true``), and evaluation also logs
    ``{val,test}/clip_acc_noise_{k}`` per bucket k of the noise fraction sigma^2 / (alpha^2 + sigma^2).

    Args:
        net: The CLIP.
        optimizer: Optimizer factory (default AdamW, lr 5e-4, weight decay 0.1).
        process: Forward process whose x_t a noised CLIP is trained on; None for clean images.
        templates: Caption templates with one ``{}`` for the class name; the first one makes the zero-shot prompts.
        noise_buckets: Buckets of the per-noise-level zero-shot accuracy.
        lr_scheduler: Learning-rate schedule factory, e.g. ``WarmupLR`` (default: constant).
        image_size: Side of the data's images (linked from the data config; the net resizes to its own).
        channels: Channels of the data's images (linked from the data config; must be the net's ``in_channels``).
    """

    #: What the weights mean: a checkpoint of another net or process is refused (``CheckpointChecks``).
    MUST_MATCH = ("net", "process", "channels")
    RUN_METRICS = ("val/loss", "val/clip_acc")
    BUCKET_METRIC = "clip_acc_noise"

    def __init__(
        self,
        net: CLIPNet,
        optimizer: OptimizerCallable = default_optimizer,
        process: ForwardProcess | None = None,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        noise_buckets: int = 4,
        lr_scheduler: LRSchedulerCallable | None = None,
        image_size: int = 32,
        channels: int = 3,
    ) -> None:
        super().__init__()
        if is_spec(net) or is_spec(process):  # the specs a checkpoint stores: load_from_checkpoint outside the CLI
            net, process = build(net, "the net argument"), build(process, "the process argument")
        bad = [template for template in templates if template.count("{}") != 1]
        if bad:
            raise ValueError(f"caption templates need exactly one '{{}}' for the class name, got {bad}")
        if net.in_channels != channels:
            raise ValueError(f"the CLIP net takes {net.in_channels}-channel images but the data has {channels}: "
                             "set model.init_args.net.init_args.in_channels to data.init_args.image_format.channels")
        self.register_parts({"net": net, "process": process}, optimizer, lr_scheduler)
        self.hparams["templates"] = list(templates)
        self.net = net
        self.init_noisy_inputs(process, noise_buckets, net.time_conditional)
        self.class_names: list[str] = []
        self._caption_template = list(templates)[:1]

    @property
    def trained(self) -> nn.Module:
        return self.net

    # ------------------------------------------------------------------------------------------- captions

    def setup(self, stage: str) -> None:
        """Take the class names (and, without templates, the caption template) from the attached datamodule."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and not self.class_names:
            self.class_names = list(datamodule.class_names)
            if not self._caption_template:
                self._caption_template = [datamodule.hparams.caption_template]

    @property
    def zero_shot_prompts(self) -> list[str]:
        """One prompt per class, in label order: the first template filled with each class name."""
        if not self.class_names:
            raise RuntimeError("CLIPModule knows no class names: attach an ImageDataModule (the Trainer does) or "
                               "load a checkpoint that stores them")
        return [self._caption_template[0].format(name) for name in self.class_names]

    def captions(self, batch: dict[str, Any], generator: torch.Generator | None) -> list[str]:
        """One caption per image: a random template filled with its class name, or the batch's caption."""
        templates = self.hparams.templates
        if not templates:
            return list(batch["caption"])
        labels = batch["label"].tolist()
        picks = torch.randint(len(templates), (len(labels),), generator=generator).tolist()
        return [templates[pick].format(self.class_names[label]) for pick, label in zip(picks, labels)]

    # ------------------------------------------------------------------------------------------- steps

    def _step(self, batch: dict[str, Any], stage: str, seed: int | None) -> Tensor:
        """Loss (and, in evaluation, zero-shot accuracy) of one batch, logged under ``stage``; evaluation draws its
        noise and templates from generators seeded by ``seed``, training from the global RNG (exact resume)."""
        noise_generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        template_generator = None if seed is None else torch.Generator().manual_seed(seed)
        inputs = self.noisy_input(batch["image"], noise_generator)
        image_features = self.net.encode_image(inputs.x, inputs.t)
        text_features = self.net.encode_text(self.captions(batch, template_generator))
        labels = batch["label"]
        loss = label_aware_contrastive_loss(self.net.similarity(image_features, text_features), labels)
        training, size = stage == "train", labels.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=training, sync_dist=not training, batch_size=size)
        if training:
            self.log("train/logit_scale", self.net.logit_scale, batch_size=size)
            return loss
        with torch.no_grad():
            prompts = self.net.encode_text(self.zero_shot_prompts)
            correct = self.net.similarity(image_features, prompts).argmax(-1) == labels
        self.log(f"{stage}/clip_acc", correct.float().mean(), prog_bar=True, sync_dist=True, batch_size=size)
        self.count_correct(stage, correct, inputs.noise_fraction)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train", None)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.net.clamp_logit_scale()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val", self.evaluation_seed(batch_idx))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test", self.evaluation_seed(batch_idx))

    # ------------------------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # refuses non-finite weights; keeps the process marginals
        checkpoint[CLASS_NAMES_KEY] = list(self.class_names)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # refuses a checkpoint of another net or process; its marginals
        self.class_names = list(checkpoint.get(CLASS_NAMES_KEY, self.class_names))
