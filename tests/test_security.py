"""Loading never runs code a file chose (issue 24, part 1).

Crafted checkpoints hold specs whose class path is a callable that would leave a sentinel file (``os.system``,
``posix.system``, ``subprocess.Popen``, ``builtins.eval``/``exec``, a module whose import writes it), at the top of a
part's spec, nested in ``init_args``, or in the guidance/sampler/first-stage specs of a diffusion checkpoint. Every
loader of the package gets them with a valid SHA-256 (the checksum is unkeyed): none may execute anything, each
refuses with one error that names the class path and how to allow a trusted part.
"""

from __future__ import annotations

import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
from helpers import tiny_args

from diffusion_pl.conditioning import Text
from diffusion_pl.core.checkpoint_file import write_checkpoint
from diffusion_pl.core.errors import CheckpointError, UntrustedPartError
from diffusion_pl.core.spec import ALLOW_ENV, allow_parts, build, spec_of
from diffusion_pl.guidance import CLIP, Classifier
from diffusion_pl.metrics import ClassifierFeatures
from diffusion_pl.models import AutoencoderModule, CLIPModule, DiffusionModule
from diffusion_pl.models.classifier import ClassifierModule
from diffusion_pl.nets import UNet
from diffusion_pl.nets.autoencoder import KLAutoencoder
from diffusion_pl.nets.classifier import EncoderClassifier, load_classifier_net
from diffusion_pl.nets.clip import CLIPNet, load_clip
from diffusion_pl.nets.first_stage import Autoencoder
from diffusion_pl.processes import DiscreteProcess
from diffusion_pl.samplers import DDIM

SENTINEL_MODULE = "diffusion_pl_test_sentinel_module"


def payloads(sentinel: Path) -> dict[str, dict[str, Any]]:
    """name -> a spec that leaves ``sentinel`` if anything constructs (or imports) it."""
    return {
        "os.system": {"class_path": "os.system", "init_args": {"command": f"touch {sentinel}"}},
        "posix.system": {"class_path": "posix.system", "init_args": {"command": f"touch {sentinel}"}},
        "subprocess.Popen": {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(sentinel)]}},
        "builtins.eval": {"class_path": "builtins.eval", "init_args": {"source": f"open({str(sentinel)!r}, 'w')"}},
        "builtins.exec": {"class_path": "builtins.exec", "init_args": {"source": f"open({str(sentinel)!r}, 'w')"}},
        "import side effect": {"class_path": f"{SENTINEL_MODULE}.Anything", "init_args": {}},
        "module of ours, not a class": {"class_path": "diffusion_pl.core.spec.os", "init_args": {}},
        "non-part class of ours": {"class_path": "diffusion_pl.core.errors.UserError", "init_args": {}},
    }


@pytest.fixture()
def sentinel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file a payload would write; a module on sys.path whose import writes it too."""
    path = tmp_path / "pwned"
    (tmp_path / f"{SENTINEL_MODULE}.py").write_text(f"open({str(path)!r}, 'w').close()\nclass Anything: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    yield path
    sys.modules.pop(SENTINEL_MODULE, None)


def nested(payload: dict[str, Any], spec: dict[str, Any], argument: str) -> dict[str, Any]:
    """``spec`` with ``payload`` as the value of one of its init args."""
    return {**spec, "init_args": {**spec["init_args"], argument: payload}}


def tiny_unet() -> UNet:
    return UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=())


def diffusion_checkpoint(path: Path, **spec_overrides: Any) -> Path:
    """A tiny DiffusionModule checkpoint as Lightning writes it, with some hyperparameters replaced."""
    module = DiffusionModule(tiny_unet(), DiscreteProcess(100, "cosine"), sampler=DDIM(steps=2), image_size=8, channels=1)
    hparams = {**dict(module.hparams), **spec_overrides}
    write_checkpoint({"state_dict": module.state_dict(), "hyper_parameters": hparams,
                      "pytorch-lightning_version": lightning.__version__}, path)
    return path


def part_checkpoint(path: Path, net_spec: dict[str, Any], prefix: str) -> Path:
    """A checkpoint whose ``net`` spec is ``net_spec`` (weights of a tiny classifier under ``prefix``)."""
    net = EncoderClassifier(image_size=8, in_channels=1, num_classes=3, base_channels=8, channel_mult=(1,),
                            num_res_blocks=1, attention_resolutions=())
    state = {f"{prefix}{name}": value for name, value in net.state_dict().items()}
    write_checkpoint({"state_dict": state, "hyper_parameters": {"net": net_spec, "image_size": 8, "channels": 1},
                      "pytorch-lightning_version": lightning.__version__}, path)
    return path


# Every loader of a part's checkpoint: (what it loads, the prefix of its weights, the class of net it expects).
CLASSIFIER, AUTOENCODER, CLIP_NET = ("diffusion_pl.nets.classifier.EncoderClassifier",
                                     "diffusion_pl.nets.autoencoder.KLAutoencoder", "diffusion_pl.nets.clip.CLIPNet")
PART_LOADERS: dict[str, tuple[Callable[[str], Any], str, str]] = {
    "guidance.Classifier": (lambda p: Classifier(p).prepare(DiscreteProcess(100, "cosine"), torch.device("cpu")),
                            "net.", CLASSIFIER),
    "nets.classifier.load_classifier_net": (load_classifier_net, "net.", CLASSIFIER),
    "metrics.ClassifierFeatures (FID domain extractor)": (ClassifierFeatures, "net.", CLASSIFIER),
    "first_stage.Autoencoder": (lambda p: Autoencoder(p), "autoencoder.", AUTOENCODER),
    "nets.clip.load_clip": (load_clip, "net.", CLIP_NET),
    "guidance.CLIP": (lambda p: CLIP(p, prompts=["a"]).prepare(DiscreteProcess(100, "cosine"), torch.device("cpu")),
                      "net.", CLIP_NET),
    "conditioning.Text": (lambda p: Text(p), "net.", CLIP_NET),
    "ClassifierModule.load_from_checkpoint": (ClassifierModule.load_from_checkpoint, "net.", CLASSIFIER),
    "CLIPModule.load_from_checkpoint": (CLIPModule.load_from_checkpoint, "net.", CLIP_NET),
    "AutoencoderModule.load_from_checkpoint": (AutoencoderModule.load_from_checkpoint, "autoencoder.", AUTOENCODER),
}


def assert_refused(load: Callable[[], Any], sentinel: Path, class_path: str) -> None:
    """``load()`` raises one short refusal naming ``class_path`` and the opt-in, and writes nothing."""
    with pytest.raises(UntrustedPartError) as info:
        load()
    text = str(info.value)
    assert class_path in text and ALLOW_ENV in text and len(text.splitlines()) == 1, text
    assert not sentinel.exists(), "the payload ran"
    assert SENTINEL_MODULE not in sys.modules, "the payload's module was imported"


@pytest.mark.parametrize("loader", sorted(PART_LOADERS))
@pytest.mark.parametrize("payload", sorted(payloads(Path("x"))))
def test_crafted_part_checkpoint_runs_nothing_in_any_loader(loader: str, payload: str, sentinel: Path,
                                                            tmp_path: Path) -> None:
    load, prefix, _ = PART_LOADERS[loader]
    spec = payloads(sentinel)[payload]
    path = part_checkpoint(tmp_path / "crafted.ckpt", spec, prefix)
    assert_refused(lambda: load(str(path)), sentinel, spec["class_path"])


@pytest.mark.parametrize("loader", sorted(PART_LOADERS))
def test_payload_nested_in_init_args_runs_nothing(loader: str, sentinel: Path, tmp_path: Path) -> None:
    """A legitimate net spec of the loader's kind whose argument is a payload spec: refused before the net is built."""
    load, prefix, net_class = PART_LOADERS[loader]
    good = {"class_path": net_class, "init_args": {"image_size": 8}}
    path = part_checkpoint(tmp_path / "nested.ckpt", nested(payloads(sentinel)["os.system"], good, "dropout"), prefix)
    assert_refused(lambda: load(str(path)), sentinel, "os.system")


@pytest.mark.parametrize("hparam", ["net", "process", "sampler", "loss", "first_stage", "likelihood", "guidance",
                                    "conditioner", "predict_task", "optimizer", "lr_scheduler"])
def test_diffusion_checkpoint_with_a_payload_in_any_part_runs_nothing(hparam: str, sentinel: Path,
                                                                     tmp_path: Path) -> None:
    """``DiffusionModule.load_from_checkpoint`` (what cascade stages use): a payload as any part's spec, in a list
    (guidance) or as the optimizer factory, is refused; so is one nested in the net's arguments."""
    payload = payloads(sentinel)["subprocess.Popen"]
    path = diffusion_checkpoint(tmp_path / f"{hparam}.ckpt", **{hparam: [payload] if hparam == "guidance" else payload})
    assert_refused(lambda: DiffusionModule.load_from_checkpoint(path), sentinel, "subprocess.Popen")


def test_nested_payload_in_a_diffusion_net_runs_nothing(sentinel: Path, tmp_path: Path) -> None:
    net = spec_of(tiny_unet())
    path = diffusion_checkpoint(tmp_path / "nested.ckpt", net=nested(payloads(sentinel)["builtins.eval"], net, "dropout"))
    assert_refused(lambda: DiffusionModule.load_from_checkpoint(path), sentinel, "builtins.eval")


def test_lightning_instantiator_payload_is_refused(sentinel: Path, tmp_path: Path) -> None:
    path = diffusion_checkpoint(tmp_path / "instantiator.ckpt", _instantiator="os.system")
    with pytest.raises(ValueError, match="instantiator"):
        DiffusionModule.load_from_checkpoint(path)
    assert not sentinel.exists()


def test_cli_refuses_a_crafted_first_stage_before_training(sentinel: Path, tmp_path: Path) -> None:
    """The latent config's first stage is read while the CLI parses: a crafted autoencoder checkpoint is refused
    there, as the command line's one-screen error (exit 2), and nothing runs."""
    from helpers import run_cli_processes

    path = part_checkpoint(tmp_path / "autoencoder.ckpt", payloads(sentinel)["os.system"], "autoencoder.")
    config = str(Path(__file__).parent.parent / "configs" / "ldm" / "fashion_mnist.yaml")
    args = tiny_args(tmp_path / "run", "--trainer.max_steps=1", config=config)
    args[args.index(next(a for a in args if a.startswith("--model.init_args.first_stage.init_args.checkpoint=")))] = \
        f"--model.init_args.first_stage.init_args.checkpoint={path}"
    result = run_cli_processes([["fit", *args]])[0]
    assert result.returncode == 2 and "error: " in result.stderr and "os.system" in result.stderr, result.stderr[-2000:]
    assert not sentinel.exists()


def test_registered_parts_optimizers_and_allowed_classes_still_build(sentinel: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What specs may name: the framework's parts, torch.optim optimizers/schedulers, and classes the user allowed
    (Python call or environment variable); a refused one builds once allowed."""
    assert isinstance(build(spec_of(DDIM(steps=3))), DDIM)
    assert isinstance(build({"class_path": "diffusion_pl.samplers.DDIM", "init_args": {"steps": 3}}), DDIM)
    optimizer = build({"class_path": "torch.optim.AdamW", "init_args": {"params": [torch.zeros(1, requires_grad=True)],
                                                                          "lr": 0.1}})
    assert isinstance(optimizer, torch.optim.AdamW)
    spec = {"class_path": "collections.OrderedDict", "init_args": {}}
    with pytest.raises(UntrustedPartError):
        build(spec)
    monkeypatch.setenv(ALLOW_ENV, "json.JSONDecoder, collections.")
    assert type(build(spec)).__name__ == "OrderedDict"
    monkeypatch.delenv(ALLOW_ENV)
    allow_parts("fractions.Fraction")
    assert build({"class_path": "fractions.Fraction", "init_args": {"numerator": 3}}) == 3
    assert not sentinel.exists()


def test_a_users_configurable_part_registers_itself(tmp_path: Path) -> None:
    """A Configurable subclass of the user's own module builds from its spec once the module is imported."""
    from diffusion_pl.core.spec import Configurable

    class MyPart(Configurable):
        def __init__(self, width: int = 3) -> None:
            self.width = width

    rebuilt = build(spec_of(MyPart(width=5)))
    assert isinstance(rebuilt, MyPart) and rebuilt.width == 5


def test_unreleased_torchscript_clip_is_refused_unloaded(tmp_path: Path, sentinel: Path) -> None:
    """``torch.jit.load`` runs the code stored in an archive: a TorchScript file that is not one of OpenAI's released
    CLIP files (by SHA-256) is refused by every CLIP loader before it is loaded."""

    class Writes(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    path = tmp_path / "clip.pt"
    torch.jit.save(torch.jit.script(Writes()), str(path))
    assert any(name.endswith("constants.pkl") for name in zipfile.ZipFile(path).namelist())
    for load in (load_clip, Text, lambda p: CLIP(p, prompts=["a"]).prepare(DiscreteProcess(100, "cosine"), torch.device("cpu"))):
        with pytest.raises(CheckpointError, match="not one of OpenAI's released CLIP files"):
            load(str(path))


def test_clean_checkpoints_of_every_kind_still_load(tmp_path: Path) -> None:
    """The refusals are not blanket ones: genuine checkpoints rebuild through the same loaders."""
    classifier = part_checkpoint(tmp_path / "classifier.ckpt", spec_of(EncoderClassifier(
        image_size=8, in_channels=1, num_classes=3, base_channels=8, channel_mult=(1,), num_res_blocks=1,
        attention_resolutions=())), "net.")
    assert isinstance(load_classifier_net(str(classifier)), EncoderClassifier)
    assert isinstance(DiffusionModule.load_from_checkpoint(diffusion_checkpoint(tmp_path / "d.ckpt")), DiffusionModule)
    exported = CLIPNet(image_size=8, vision_layers=1, transformer_layers=1, context_length=8).export(tmp_path / "c.pt")
    assert isinstance(load_clip(str(exported)), CLIPNet)
    autoencoder = KLAutoencoder(in_channels=1, latent_channels=4, base_channels=8, channel_mult=(1, 2))
    state = {f"autoencoder.{k}": v for k, v in autoencoder.state_dict().items()}
    write_checkpoint({"state_dict": state, "hyper_parameters": {"net": spec_of(autoencoder)}}, tmp_path / "ae.ckpt")
    assert Autoencoder(str(tmp_path / "ae.ckpt")).latent_shape((1, 8, 8)) == (4, 4, 4)
