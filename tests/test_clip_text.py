"""Prompts from the command line: CLIP-guided and text-conditional `predict` write each sample's prompt; the Text
conditioner (frozen CLIP text features, caption dropout) and its config."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DDPM_FASHION, REPO, last_checkpoint, predict_samples, run_cli, run_trainer

from diffusion_pl.callbacks import EMA
from diffusion_pl.conditioning import Text
from diffusion_pl.core.errors import ConfigError
from diffusion_pl.guidance import CLIP
from diffusion_pl.models import DiffusionModule
from diffusion_pl.nets import UNet
from diffusion_pl.nets import clip as clip_module
from diffusion_pl.nets.clip import MAX_CUT_PROMPT_WARNINGS, load_clip

TEXT_CFG = str(REPO / "configs" / "clip" / "text_cfg_fashion_mnist.yaml")
PROMPTS = ["a photo of a 3", "a photo of a 7"]
PREDICT = ["--data.init_args.predict.num=4", "--data.init_args.predict.batch_size=2",
           "--model.init_args.sampler.steps=4", f"--data.init_args.predict.prompts={PROMPTS}"]
# 3 steps without the EMA (so that the checkpoint's weights have moved from their initialisation), no validation.
FIT = ["--trainer.max_steps=3", "--trainer.limit_val_batches=0"]


def test_clip_guided_predict_writes_the_prompts(tmp_path: Path, tiny_clip_encoder: str) -> None:
    run_trainer("fit", DDPM_FASHION, *FIT, root=tmp_path / "ddpm", remove=(EMA,))
    ckpt = last_checkpoint(tmp_path / "ddpm")
    unguided = predict_samples(DDPM_FASHION, *PREDICT, root=tmp_path / "unguided", ckpt_path=ckpt)
    guidance = (f"--model.init_args.guidance=[{{class_path: diffusion_pl.guidance.CLIP, init_args: "
                f"{{model: '{tiny_clip_encoder}', scale: 50.0, view: x0}}}}]")
    guided = predict_samples(DDPM_FASHION, *PREDICT, guidance, root=tmp_path / "guided", ckpt_path=ckpt)
    assert guided["prompts"].tolist() == PROMPTS * 2 and "prompts" not in unguided
    assert guided["samples"].shape == unguided["samples"].shape == (4, 8, 8, 1)
    assert not np.array_equal(guided["samples"], unguided["samples"])  # same seeds: the guidance moved them


def test_text_cfg_config_trains_and_predicts_from_prompts(tmp_path: Path) -> None:
    cli = run_cli("fit", TEXT_CFG, "--trainer.fast_dev_run=true", root=tmp_path / "fit")
    assert cli.trainer.global_step == 1 and math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    net = cli.model.denoiser.net
    assert net.vector_dim == 64 and net.context_dim == 64 and isinstance(cli.model.conditioner, Text)
    run_trainer("fit", TEXT_CFG, *FIT, root=tmp_path / "fit3", remove=(EMA,))
    ckpt = last_checkpoint(tmp_path / "fit3")
    out = predict_samples(TEXT_CFG, *PREDICT, root=tmp_path / "predict", ckpt_path=ckpt)
    assert out["prompts"].tolist() == PROMPTS * 2 and out["samples"].shape == (4, 8, 8, 1)
    model = DiffusionModule.load_from_checkpoint(ckpt, map_location="cpu").eval()  # rebuilt with its Text part
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([50, 50])
    with torch.no_grad():
        eps = [model.sampling_denoiser(model.process, {"prompt": [p, p]})(x, t).eps for p in PROMPTS]
    assert not torch.allclose(eps[0], eps[1])  # the prompt reaches the net


def test_text_features_feed_vector_and_context_and_drop_to_the_empty_prompt(tiny_clip_encoder: str) -> None:
    text = Text(tiny_clip_encoder, dropout=0.5)
    clip = load_clip(tiny_clip_encoder)
    captions = [f"a photo of a {i}" for i in range(64)]
    cond = text({"caption": captions}, training=True, generator=torch.Generator().manual_seed(0))
    assert cond["vector"].shape == (64, 32) and cond["context"].shape == (64, 8, 64)
    with torch.no_grad():
        full, empty = clip.text_features(captions), clip.text_features([""])
    dropped = torch.rand(64, generator=torch.Generator().manual_seed(0)) < 0.5  # the same draw as the conditioner
    assert 10 < int(dropped.sum()) < 54
    torch.testing.assert_close(cond["vector"][dropped], empty.pooled.expand(int(dropped.sum()), -1))
    torch.testing.assert_close(cond["vector"][~dropped], full.pooled[~dropped])
    torch.testing.assert_close(cond["context"][~dropped], full.tokens[~dropped])
    null = text.null(cond)
    torch.testing.assert_close(null["context"], empty.tokens.expand(64, -1, -1))
    # Sampling reads batch["prompt"] and never drops.
    torch.testing.assert_close(text({"prompt": captions}, training=False)["vector"], full.pooled)
    assert not any(p.requires_grad for p in text.parameters())


def test_net_without_the_text_routes_is_refused(tiny_clip_encoder: str) -> None:
    text = Text(tiny_clip_encoder)
    with pytest.raises(ValueError, match="vector_dim=32"):
        text.check_net(UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2),
                            attention_resolutions=(4,)))
    text.check_net(UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,),
                        vector_dim=32, context_dim=64))


def test_a_prompt_longer_than_the_context_is_logged_once_with_its_token_count(
        tiny_clip_encoder: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny CLIP reads 8 tokens: a 14-token prompt is cut, logged once over three "steps"; one of exactly 8 tokens
    and a short one are not; after MAX_CUT_PROMPT_WARNINGS cut prompts nothing more is logged."""
    monkeypatch.setattr(clip_module, "_cut_prompts", set())
    clip = load_clip(tiny_clip_encoder)
    long, exact = "a photo of a very very very long prompt that goes on", "a b c d e f"  # 12 + 2 and 6 + 2 tokens
    with caplog.at_level("WARNING", logger="diffusion_pl.nets.clip"), torch.no_grad():
        for _ in range(3):
            clip.text_features([long, "a photo of a 3", exact, long])
        assert [r.getMessage() for r in caplog.records if "context length" in r.getMessage()] == [
            f"the prompt {long!r} is 14 tokens long (with the start and end tokens), longer than the CLIP's context "
            "length of 8: only its first 6 tokens are read, the rest is ignored"]
        caplog.clear()
        clip.text_features([f"{long} number {i}" for i in range(2 * MAX_CUT_PROMPT_WARNINGS)])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == MAX_CUT_PROMPT_WARNINGS - 1 and "not reported" in messages[-1]


def test_clip_guidance_refuses_an_empty_prompt(tiny_clip_encoder: str) -> None:
    with pytest.raises(ConfigError, match=r"empty prompt at position\(s\) \[1\] of its prompts.*no guidance"):
        CLIP(tiny_clip_encoder, prompts=["a photo of a 3", ""])
    guidance = CLIP(tiny_clip_encoder)
    with pytest.raises(ConfigError, match=r"empty prompt at position\(s\) \[0, 2\] of the batch's prompts"):
        guidance.wrap(None, batch={"prompt": ["", "a photo of a 3", " \t"]}, cond={}, null={}, process=None)
