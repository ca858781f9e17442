"""Text-guided inpainting: predict images of a split carry the predict prompts, and ``Inpaint`` hands them to a
text-conditional model (or CLIP guidance) and records them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DDPM_FASHION, REPO, last_checkpoint, predict_samples, run_trainer

from diffusion_pl.callbacks import EMA
from diffusion_pl.core.errors import ConfigError
from diffusion_pl.data import ImageData
from diffusion_pl.data.predict import PredictImageDataset
from diffusion_pl.models import DiffusionModule
from diffusion_pl.pipelines import Inpaint

TEXT_CFG = str(REPO / "configs" / "clip" / "text_cfg_fashion_mnist.yaml")
INPAINT = str(REPO / "overlays" / "inpaint.yaml")
PROMPTS = ["a photo of a 3", "a photo of a 7"]
REPAINT = ["method=repaint", "steps=4", "jump_length=2", "resample=2", "box=4"]
# 3 steps without the EMA (so that the checkpoint's weights have moved from their initialisation), no validation.
FIT = ["--trainer.max_steps=3", "--trainer.limit_val_batches=0"]
# ``predict`` with the inpaint overlay (overlays=[INPAINT]) on 4 test images (RePaint, a 4x4 centre box).
PREDICT = ["--data.init_args.predict.num=4", "--data.init_args.predict.batch_size=2",
           *(f"--model.init_args.predict_task.{option}" for option in REPAINT)]


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny text-conditional model (tiny CLIP text encoder, classifier-free guidance) after 3 steps."""
    root = tmp_path_factory.mktemp("text_cfg")
    run_trainer("fit", TEXT_CFG, *FIT, root=root, remove=(EMA,))
    return last_checkpoint(root)


def test_predict_images_carry_the_prompts_cycled() -> None:
    data = ImageData(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2]), ("a", "b", "c"))
    items = PredictImageDataset(data, [2, 0, 1], prompts=PROMPTS)
    assert [items[i]["prompt"] for i in range(3)] == [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    assert "prompt" not in PredictImageDataset(data, [0])[0]


def test_text_inpainting_through_the_cli_keeps_known_pixels_and_records_prompts(tmp_path: Path,
                                                                                 text_checkpoint: Path) -> None:
    out = predict_samples(TEXT_CFG, *PREDICT, f"--data.init_args.predict.prompts={PROMPTS}", root=tmp_path,
                          overlays=[INPAINT], ckpt_path=text_checkpoint, grid=True)
    samples, inputs, known = out["samples"], out["inputs"], out["masks"].astype(bool)
    assert samples.shape == inputs.shape == (4, 8, 8, 1) and known.sum() == 4 * (64 - 16)
    assert np.array_equal(samples[known], inputs[known]) and not np.array_equal(samples[~known], inputs[~known])
    assert out["prompts"].tolist() == PROMPTS * 2 and out["index"].tolist() == [0, 1, 2, 3]


def test_the_prompt_reaches_the_denoiser(text_checkpoint: Path) -> None:
    model = DiffusionModule.load_from_checkpoint(text_checkpoint, map_location="cpu").eval()
    torch.manual_seed(0)
    with torch.no_grad():  # 3 steps leave the zero-initialised layers that read the prompt near 0: wake them up
        for parameter in model.denoiser.net.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    task = Inpaint(**{key: value if key == "method" else int(value)
                      for key, value in (option.split("=") for option in REPAINT)})
    images = torch.linspace(-1, 1, 2 * 64).reshape(2, 1, 8, 8)
    batch = {"image": images, "seed": torch.tensor([0, 1]), "label": torch.tensor([3, 7]),
             "index": torch.tensor([0, 1])}

    def fill(prompt: str) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return task(model, {**batch, "prompt": [prompt, prompt]}, torch.Generator().manual_seed(0))

    first, again, other = fill(PROMPTS[0]), fill(PROMPTS[0]), fill(PROMPTS[1])
    known = first["masks"].bool()
    assert torch.equal(first["samples"], again["samples"])  # same prompt, same generator: the same fill
    assert torch.equal(first["samples"][known], other["samples"][known])
    assert not torch.equal(first["samples"][~known], other["samples"][~known])  # another prompt, another fill
    assert first["prompt"] == [PROMPTS[0]] * 2
    with pytest.raises(ConfigError, match="predict.prompts"):  # a text model without a prompt says how to give one
        task(model, batch, torch.Generator().manual_seed(0))


def test_clip_guided_inpainting_follows_the_prompt_and_keeps_known_pixels(tmp_path: Path,
                                                                          tiny_clip_encoder: str) -> None:
    run_trainer("fit", DDPM_FASHION, *FIT, root=tmp_path / "ddpm", remove=(EMA,))
    ckpt = last_checkpoint(tmp_path / "ddpm")
    guidance = (f"--model.init_args.guidance=[{{class_path: diffusion_pl.guidance.CLIP, init_args: "
                f"{{model: '{tiny_clip_encoder}', scale: 50.0, view: x0}}}}]")
    unguided = predict_samples(DDPM_FASHION, *PREDICT, root=tmp_path / "unguided", overlays=[INPAINT], ckpt_path=ckpt,
                               grid=True)
    guided = predict_samples(DDPM_FASHION, *PREDICT, guidance, f"--data.init_args.predict.prompts={PROMPTS}",
                             root=tmp_path / "guided", overlays=[INPAINT], ckpt_path=ckpt, grid=True)
    known = guided["masks"].astype(bool)
    assert np.array_equal(guided["samples"][known], guided["inputs"][known])
    assert guided["prompts"].tolist() == PROMPTS * 2 and "prompts" not in unguided
    assert not np.array_equal(guided["samples"][~known], unguided["samples"][~known])  # same seeds: guidance moved them
