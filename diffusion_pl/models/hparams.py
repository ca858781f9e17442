"""The hyperparameters that define a run, logged beside its metrics so TensorBoard's HPARAMS view compares runs."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from diffusion_pl.core.spec import is_spec

log = logging.getLogger(__name__)

Scalar = bool | int | float | str


def flatten(value: Any, prefix: str) -> dict[str, Scalar]:
    """``{"a/b": 1, ...}`` of nested specs, dicts and lists: a spec gives its class name under ``prefix`` and its
    arguments under ``prefix/arg``; a list of scalars becomes one string, e.g. ``"1,2,2"``; None is skipped."""
    if is_spec(value):
        flat: dict[str, Scalar] = {prefix: value["class_path"].rsplit(".", 1)[-1]}
        flat.update(flatten(value.get("init_args") or {}, prefix))
        return flat
    if isinstance(value, Mapping):
        flat = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}/{key}" if prefix else str(key)))
        return flat
    if isinstance(value, (list, tuple)):
        if all(isinstance(item, (bool, int, float, str)) for item in value):
            return {prefix: ",".join(map(str, value))} if value else {}
        flat = {}
        for index, item in enumerate(value):
            flat.update(flatten(item, f"{prefix}/{index}"))
        return flat
    return {} if value is None else {prefix: value}


def training_hparams(module: pl.LightningModule, parameters: nn.Module) -> dict[str, Scalar]:
    """Effective batch, base learning rate, parameter count, EMA decay (or power EMA sigma_rel) and the data set of a
    fitting module."""
    trainer = module.trainer
    group = trainer.optimizers[0].param_groups[0]
    out: dict[str, Scalar] = {"base_lr": group.get("initial_lr", group["lr"]),
                              "num_parameters": sum(p.numel() for p in parameters.parameters())}
    datamodule = getattr(trainer, "datamodule", None)
    data = dict(getattr(datamodule, "hparams", {}))
    if "batch_size" in data:
        out["effective_batch_size"] = data["batch_size"] * trainer.world_size * trainer.accumulate_grad_batches
    out.update(flatten({k: data[k] for k in ("source", "image_format", "batch_size") if k in data}, "data"))
    for callback in trainer.callbacks:
        if isinstance(callback, EMAWeightAveraging):
            out["ema_decay"] = float(getattr(callback, "decay", float("nan")))
        elif isinstance(callback, WeightAveraging) and hasattr(callback, "evaluate_sigma_rel"):  # PowerEMA
            out["ema_sigma_rel"] = float(callback.evaluate_sigma_rel)
    return out


def log_run_hparams(module: pl.LightningModule, parameters: nn.Module, metrics: Iterable[str]) -> dict[str, Scalar]:
    """Write the module's parts (flattened specs) and :func:`training_hparams` to every TensorBoard logger as the
    HPARAMS session of the run, declaring ``metrics`` as its metrics with no dummy value logged: TensorBoard
    reads them from the scalars the run logs under those names; ``hparams.yaml`` gets them too. Rank 0 only; returns
    what was logged."""
    if not module.trainer.is_global_zero:
        return {}
    flat = flatten({k: v for k, v in module.hparams.items() if not k.startswith("_")}, "")
    flat.update(training_hparams(module, parameters))
    log.info("effective batch size %s (%s per device x %d devices x %d accumulation), base lr %g, %d parameters",
             flat.get("effective_batch_size"), flat.get("data/batch_size"), module.trainer.world_size,
             module.trainer.accumulate_grad_batches, flat["base_lr"], flat["num_parameters"])
    experiment, session_start, session_end = hparams_summaries(flat, {name: 0.0 for name in metrics})
    for logger in module.trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.hparams.update(flat)  # written to hparams.yaml by the logger
            writer = logger.experiment._get_file_writer()
            for summary in (experiment, session_start, session_end):
                writer.add_summary(summary)
    return flat
