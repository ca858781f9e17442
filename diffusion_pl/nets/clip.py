"""CLIP (Radford et al. 2021) as the framework uses it: one adapter over clip-anytorch (``import clip``).

:class:`CLIPNet` holds a ``clip.model.CLIP`` built from its constructor arguments and runs it in float32 (on GPU
``clip.load`` leaves the weights in fp16; this adapter never does). It adds what guidance and conditioning need:

- differentiable preprocessing of image tensors in [-1, 1] (grayscale repeated to RGB, resize, CLIP's
  normalisation), the tensor counterpart of ``clip.load``'s PIL-only ``preprocess``;
- text features pooled (the projected EOT token, CLIP's text embedding h(c)) and per token
  (token_embedding -> transformer -> ln_final), for the ``Text`` conditioner's ``vector`` and ``context``;
- an optional time embedding for a "noised CLIP" trained on x_t (GLIDE, Nichol et al. 2022, Sec. 4);
- exact save and reload: a ``CLIPModule`` checkpoint stores the constructor arguments and the fp32 weights, and
  :meth:`CLIPNet.export` writes the fp32 state dict in OpenAI's layout, which ``clip.load(path)`` also reads
  (``clip.model.build_model`` re-infers the heads as width / 64, so both widths must be multiples of 64).

:func:`load_clip` loads a CLIPModule checkpoint, an exported or OpenAI file, or a model name (``"ViT-B/32"``: from
the local cache, downloading only when online; offline, an error says where to put the file).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_pl.core.checkpoint_file import read_checkpoint, write_checkpoint
from diffusion_pl.core.errors import CheckpointError, UserError
from diffusion_pl.core.files import file_sha256
from diffusion_pl.core.spec import Configurable
from diffusion_pl.nets.loading import rebuild
from diffusion_pl.nets.unet import SinusoidalEmbedding

log = logging.getLogger(__name__)

__all__ = ["CLASS_NAMES_KEY", "CLIPNet", "TextFeatures", "load_clip", "read_clip"]

#: CLIP's image normalisation (clip.clip._transform), per RGB channel, on [0, 1] pixels.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: The BPE vocabulary of clip.tokenize (49,152 merges + 256 bytes ... + <|startoftext|>, <|endoftext|>).
CLIP_VOCAB_SIZE = 49408
#: ln 100: the cap on CLIP's learned log temperature (Radford et al. 2021, Sec. 2.5).
MAX_LOG_SCALE = math.log(100.0)
DEFAULT_CLIP_CACHE = "~/.cache/clip"
#: Checkpoint entry of a CLIPModule with the class names (in label order) its zero-shot prompts name.
CLASS_NAMES_KEY = "clip_class_names"
#: Prompts cut to a context length that are logged one by one (a captioned data set may hold thousands).
MAX_CUT_PROMPT_WARNINGS = 5
#: The prompts logged as cut so far in this process: each is logged once, not at every step.
_cut_prompts: set[str] = set()


class CLIPNotInstalledError(UserError, ImportError):
    """clip-anytorch is missing."""


class CLIPWeightsNotFoundError(UserError, FileNotFoundError):
    """A CLIP model name whose weights are neither cached nor downloadable, or a path that does not exist."""


def import_clip() -> ModuleType:
    """The ``clip`` package (clip-anytorch), imported on first use."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            import clip
    except ImportError as error:
        raise CLIPNotInstalledError(
            f"CLIP needs the clip-anytorch package ({error}): pip install clip-anytorch "
            "(or pip install 'diffusion_pl', which declares it)") from error
    return clip


class TextFeatures(NamedTuple):
    """CLIP text features of a batch of prompts.

    Attributes:
        pooled: The text embedding h(c) (B, embed_dim): the final-layer EOT token times ``text_projection``.
        tokens: Per-token features (B, context_length, transformer_width) after ``ln_final`` (not projected).
    """

    pooled: Tensor
    tokens: Tensor


class CLIPNet(Configurable, nn.Module):
    """A CLIP (``clip.model.CLIP``) with tensor preprocessing and an optional time embedding, always in float32.

    Args:
        image_size: CLIP's input resolution; images of any size are resized to it by :meth:`preprocess`.
        in_channels: Channels of the data it is trained on: 1 or 3 (either is accepted; grayscale is repeated to RGB).
        embed_dim: Width of the joint embedding space.
        vision_layers: Transformer layers of the ViT image encoder, or 4 stage depths of a ModifiedResNet.
        vision_width: Width of the image encoder, a multiple of 64 (heads = width / 64, as ``clip.model.CLIP``).
        vision_patch_size: ViT patch size (dividing ``image_size``); None for a ResNet.
        context_length: Tokens per prompt (longer prompts are truncated).
        transformer_width: Width of the text transformer, a multiple of 64 (heads = width / 64).
        transformer_layers: Layers of the text transformer.
        vocab_size: Token vocabulary; 49,408 is ``clip.tokenize``'s.
        time_conditional: Embed the diffusion time of a noisy input x_t (GLIDE's noised CLIP): a sinusoidal
            embedding through an MLP, added to the ViT's class token.
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        embed_dim: int = 64,
        vision_layers: int | list[int] = 3,
        vision_width: int = 64,
        vision_patch_size: int | None = 4,
        context_length: int = 16,
        transformer_width: int = 64,
        transformer_layers: int = 2,
        vocab_size: int = CLIP_VOCAB_SIZE,
        time_conditional: bool = False,
    ) -> None:
        super().__init__()
        vit = not isinstance(vision_layers, (list, tuple))
        _check_arguments(image_size, in_channels, vit, vision_width, vision_patch_size, transformer_width,
                         vocab_size, time_conditional)
        clip = import_clip()
        self.model = clip.model.CLIP(
            embed_dim, image_size, vision_layers if vit else tuple(vision_layers), vision_width,
            vision_patch_size if vit else None, context_length, vocab_size, transformer_width,
            transformer_width // 64, transformer_layers)
        self.image_size, self.in_channels, self.embed_dim = image_size, in_channels, embed_dim
        self.context_length, self.time_conditional = context_length, time_conditional
        self.time_embed = nn.Sequential(
            SinusoidalEmbedding(vision_width), nn.Linear(vision_width, vision_width), nn.SiLU(),
            nn.Linear(vision_width, vision_width)) if time_conditional else None
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------------------------------- images

    def preprocess(self, images: Tensor) -> Tensor:
        """CLIP's input for images in [-1, 1] (B, C, H, W), differentiably: grayscale repeated to RGB, the shorter
        side resized to ``image_size`` (bicubic, antialiased: PIL's filter) and centre-cropped, then
        ``(x - mean) / std`` on [0, 1] pixels; the tensor form of ``clip.load``'s preprocess (no clamping, so noisy
        x_t keeps its range and its gradient)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"CLIPNet takes grayscale or RGB images (B, 1 or 3, H, W) in [-1, 1], got "
                             f"{tuple(images.shape)}")
        x = (images.float() + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        height, width = x.shape[-2:]
        if (height, width) != (self.image_size, self.image_size):
            scale = self.image_size / min(height, width)
            size = (max(self.image_size, round(height * scale)), max(self.image_size, round(width * scale)))
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
            top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
            x = x[..., top:top + self.image_size, left:left + self.image_size]
        return (x - self.mean) / self.std

    def encode_image(self, images: Tensor, t: Tensor | None = None) -> Tensor:
        """The image embedding g(x) (B, embed_dim), not normalised, of images in [-1, 1]; ``t`` is the network
        time of a noisy x_t (only for a time-conditional net)."""
        x = self.preprocess(images)
        if self.time_embed is None:
            if t is not None:
                raise ValueError("CLIPNet got a time t but was built with time_conditional=False: a clean CLIP sees "
                                 "clean images (guide its x0 view), or train a noised CLIP (time_conditional: true)")
            return self.model.visual(x)
        if t is None:
            raise ValueError("a noised (time-conditional) CLIPNet needs the time t of its input x_t")
        return self._noised_vit(x, self.time_embed(t.float().expand(x.shape[0])))

    def _noised_vit(self, x: Tensor, time: Tensor) -> Tensor:
        """``clip.model.VisionTransformer.forward`` with the time embedding added to the class token."""
        visual = self.model.visual
        x = visual.conv1(x).flatten(2).transpose(1, 2)  # (B, grid^2, width)
        cls = (visual.class_embedding + time).unsqueeze(1)
        x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
        x = visual.transformer(x.transpose(0, 1)).transpose(0, 1)
        return visual.ln_post(x[:, 0]) @ visual.proj

    # ------------------------------------------------------------------------------------------- text

    def tokenize(self, prompts: list[str] | tuple[str, ...]) -> Tensor:
        """``clip.tokenize`` to this net's context length, on the net's device. A longer prompt is cut to its first
        tokens, with a warning (:func:`warn_cut_prompts`)."""
        tokens = import_clip().tokenize(list(prompts), context_length=self.context_length, truncate=True)
        warn_cut_prompts(prompts, tokens)
        return tokens.to(self.mean.device)

    def text_features(self, prompts: list[str] | tuple[str, ...]) -> TextFeatures:
        """Pooled and per-token text features of ``prompts`` (``clip.model.CLIP.encode_text``, keeping the tokens).
        Each distinct prompt is encoded once (batches of class captions repeat a few prompts)."""
        distinct = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}
        tokens = self.tokenize(list(distinct))
        model = self.model
        x = model.token_embedding(tokens) + model.positional_embedding
        x = model.ln_final(model.transformer(x.transpose(0, 1)).transpose(0, 1))
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ model.text_projection
        index = torch.tensor([distinct[prompt] for prompt in prompts], device=x.device)
        return TextFeatures(pooled[index], x[index])

    def encode_text(self, prompts: list[str] | tuple[str, ...]) -> Tensor:
        """The text embedding h(c) (B, embed_dim), not normalised."""
        return self.text_features(prompts).pooled

    # ------------------------------------------------------------------------------------------- similarity

    @property
    def logit_scale(self) -> Tensor:
        """tau = exp(logit_scale), capped at 100: the inverse temperature of CLIP's cosine logits."""
        return self.model.logit_scale.clamp(max=MAX_LOG_SCALE).exp()

    def similarity(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """tau cos(g_i, h_j) for each image i and text j: CLIP's logits (B_img, B_txt) (Radford et al. 2021, Fig. 3)."""
        return self.logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T

    def clamp_logit_scale(self) -> None:
        """Keep the learned log temperature at most ln 100 (Radford et al. 2021, Sec. 2.5); call after each step."""
        with torch.no_grad():
            self.model.logit_scale.clamp_(max=MAX_LOG_SCALE)

    # ------------------------------------------------------------------------------------------- files

    def export(self, path: str | Path) -> Path:
        """Write the fp32 state dict in OpenAI's layout, a file both ``clip.load(path)`` and :func:`load_clip` read
        (the latter exactly, in float32). A noised CLIP's time embedding has no place there: refused."""
        if self.time_embed is not None:
            raise ValueError("a noised (time-conditional) CLIP cannot be exported for clip.load, which has no time "
                             "embedding: load its CLIPModule checkpoint with load_clip instead")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_checkpoint({k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}, path)
        return path

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], in_channels: int = 3) -> CLIPNet:
        """The net of an OpenAI-layout state dict (a ``clip.load`` file or :meth:`export`'s), its weights in float32;
        the architecture is read off the shapes as ``clip.model.build_model`` does."""
        state = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
        net = cls(**_arguments_of(state), in_channels=in_channels)
        try:
            net.model.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as error:
            raise CheckpointError(f"the CLIP state dict does not fit the architecture read off it ({error})") from error
        return net.eval()


@functools.cache
def _tokenizer() -> Any:
    """The BPE tokenizer of ``clip.tokenize`` (read once per process)."""
    return import_clip().simple_tokenizer.SimpleTokenizer()


def token_count(prompt: str) -> int:
    """Tokens of ``prompt`` in ``clip.tokenize``, the start and end tokens included."""
    return len(_tokenizer().encode(prompt)) + 2


def warn_cut_prompts(prompts: list[str] | tuple[str, ...], tokens: Tensor) -> None:
    """Log each prompt that ``tokens`` (``clip.tokenize(prompts, truncate=True)``) cut to the context length, with
    its token count: once per prompt and process, and after :data:`MAX_CUT_PROMPT_WARNINGS` of them no more. Only a
    prompt that fills the whole context (a non-zero last token) is counted."""
    context_length = tokens.shape[1]
    for prompt, last in zip(prompts, tokens[:, -1].tolist()):
        if len(_cut_prompts) >= MAX_CUT_PROMPT_WARNINGS:
            return
        if last == 0 or prompt in _cut_prompts:
            continue  # it ends before the context does, or it was reported
        count = token_count(prompt)
        if count > context_length:
            _cut_prompts.add(prompt)
            more = (" (further prompts cut to the context length are not reported)"
                    if len(_cut_prompts) == MAX_CUT_PROMPT_WARNINGS else "")
            log.warning("the prompt %r is %d tokens long (with the start and end tokens), longer than the CLIP's "
                        "context length of %d: only its first %d tokens are read, the rest is ignored%s",
                        _shortened(prompt), count, context_length, context_length - 2, more)


def _shortened(prompt: str, limit: int = 80) -> str:
    return prompt if len(prompt) <= limit else prompt[:limit] + "..."


def _check_arguments(image_size: int, in_channels: int, vit: bool, vision_width: int, patch: int | None,
                     transformer_width: int, vocab_size: int, time_conditional: bool) -> None:
    """Raise ValueError naming the fix for arguments ``clip.model.CLIP`` or ``clip.load`` cannot take."""
    if in_channels not in (1, 3):
        raise ValueError(f"CLIPNet takes 1 (grayscale, repeated to RGB) or 3 channels, got in_channels={in_channels}")
    for name, width in (("vision_width", vision_width), ("transformer_width", transformer_width)):
        if width < 64 or width % 64:
            raise ValueError(f"{name}={width}: CLIP's attention uses heads of width 64 (heads = width / 64, which "
                             f"clip.load re-infers): give a positive multiple of 64")
    if vit and (patch is None or patch < 1 or image_size % patch):
        raise ValueError(f"vision_patch_size={patch} must divide image_size={image_size} (ViT patches)")
    if not vit and time_conditional:
        raise ValueError("time_conditional needs the ViT image encoder (vision_layers an integer)")
    if vocab_size != CLIP_VOCAB_SIZE:
        log.warning("vocab_size=%d differs from clip.tokenize's %d: token ids beyond it will fail", vocab_size,
                    CLIP_VOCAB_SIZE)


def _arguments_of(state: dict[str, Tensor]) -> dict[str, Any]:
    """CLIPNet's constructor arguments read off an OpenAI-layout state dict (``clip.model.build_model``'s rules)."""
    def count(prefix: str, depth: int) -> int:
        return len({k.split(".")[depth] for k in state if k.startswith(prefix)})

    if "visual.proj" in state:
        patch = state["visual.conv1.weight"].shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision: dict[str, Any] = {"vision_layers": count("visual.transformer.resblocks.", 3),
                                  "vision_width": state["visual.conv1.weight"].shape[0],
                                  "vision_patch_size": patch, "image_size": patch * grid}
    else:
        grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = {"vision_layers": [count(f"visual.layer{b}.", 2) for b in range(1, 5)],
                  "vision_width": state["visual.layer1.0.conv1.weight"].shape[0], "vision_patch_size": None,
                  "image_size": grid * 32}
    return {**vision, "embed_dim": state["text_projection"].shape[1],
            "context_length": state["positional_embedding"].shape[0],
            "vocab_size": state["token_embedding.weight"].shape[0],
            "transformer_width": state["ln_final.weight"].shape[0],
            "transformer_layers": count("transformer.resblocks.", 2)}


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (OpenAI's released ``.pt`` files are)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def check_released_torchscript(path: Path) -> None:
    """Refuse a TorchScript archive that is not one of OpenAI's released CLIP files: loading TorchScript runs the code
    stored in it. A released file is recognised by its SHA-256, which clip's download addresses carry (the folder
    before the file name); ``clip.load`` checks downloads against the same digests.

    Raises:
        CheckpointError: Any other TorchScript file; the message says how to turn it into a plain state dict.
    """
    released = {url.rstrip("/").split("/")[-2]: name for name, url in import_clip().clip._MODELS.items()}
    if file_sha256(path) not in released:
        raise CheckpointError(
            f"{path} is a TorchScript archive but not one of OpenAI's released CLIP files (its SHA-256 matches none of "
            "their published digests): loading TorchScript runs the code stored in it, so it is refused. If you trust "
            "it, save its weights as a plain state dict once (torch.save(torch.jit.load(path).state_dict(), "
            "'clip_state.pt')) and give that file")


def _load_file(path: Path) -> tuple[CLIPNet, dict[str, Any]]:
    """A CLIPModule checkpoint (exact: its spec and fp32 weights), an exported state dict or an OpenAI file (only a
    released one, by its digest: :func:`check_released_torchscript`)."""
    if _is_torchscript(path):
        check_released_torchscript(path)
        return CLIPNet.from_state_dict(torch.jit.load(str(path), map_location="cpu").state_dict()), {}
    stored = read_checkpoint(path, map_location="cpu", weights_only=True)
    if isinstance(stored, dict) and "state_dict" in stored:
        net = rebuild(stored, "net", "net.", str(path), "CLIPModule checkpoint", CLIPNet)
        return net, {k: v for k, v in stored.items() if k not in ("state_dict", "optimizer_states")}
    if isinstance(stored, dict) and "text_projection" in stored:
        return CLIPNet.from_state_dict(stored), {}
    raise CheckpointError(f"{path} is neither a CLIPModule checkpoint nor a CLIP state dict (clip.load's format)")


def read_clip(source: str | Path, *, download_root: str | None = None) -> tuple[CLIPNet, dict[str, Any]]:
    """:func:`load_clip`, and the other entries of a CLIPModule checkpoint (e.g. ``CLASS_NAMES_KEY``, the process
    marginals of a noised CLIP); an empty dict for released models and exported files."""
    path = Path(source).expanduser()
    with torch.random.fork_rng(devices=[]):  # building the net draws its (overwritten) initial weights
        if path.is_file():
            net, entries = _load_file(path)
        else:
            net, entries = _load_name(str(source), os.path.expanduser(download_root or DEFAULT_CLIP_CACHE)), {}
    return net.requires_grad_(False).eval(), entries


def load_clip(source: str | Path, *, download_root: str | None = None) -> CLIPNet:
    """A frozen CLIP in float32 on the CPU, in eval mode, leaving the global RNG untouched.

    Args:
        source: A ``CLIPModule`` checkpoint (trained by ``diffusion-pl fit --config configs/clip/...``), a file in
            ``clip.load``'s format (OpenAI's TorchScript ``.pt`` or :meth:`CLIPNet.export`'s state dict), or a
            model name of ``clip.available_models()`` (read from ``download_root``, downloaded there when online).
        download_root: Where model names are cached (default ``~/.cache/clip``, as ``clip.load``).

    Raises:
        CLIPWeightsNotFoundError: No such file, an unknown name, or a name whose weights are not cached and cannot
            be downloaded (offline): the message says where to put them.
    """
    return read_clip(source, download_root=download_root)[0]


def _load_name(name: str, root: str) -> CLIPNet:
    """The released CLIP ``name``, through ``clip.load`` (which downloads it into ``root`` when not cached)."""
    clip = import_clip()
    urls = clip.clip._MODELS
    if name not in urls:
        raise CLIPWeightsNotFoundError(
            f"CLIP model {name!r} is neither a file nor a released model ({', '.join(clip.available_models())}): "
            "give the path of a CLIPModule checkpoint (diffusion-pl fit --config configs/clip/fashion_mnist.yaml) "
            "or of a clip.load file, or one of those names")
    filename = os.path.basename(urls[name])
    try:
        model, _ = clip.load(name, device="cpu", jit=False, download_root=root)
    except OSError as error:  # urllib's URLError / HTTPError / socket errors when offline
        raise CLIPWeightsNotFoundError(
            f"CLIP weights {name!r} are not in {root} and could not be downloaded ({error}). Offline: copy "
            f"{filename} (from {urls[name]}) into {root}, or pass download_root, or give the path of a local file "
            "(clip.load's format or a CLIPModule checkpoint: diffusion-pl fit --config configs/clip/fashion_mnist.yaml)"
        ) from error
    return CLIPNet.from_state_dict(model.state_dict())
