"""What ``diffusion-pl-eval`` computes: the metrics a request selects, for one set of samples.

Samples are an .npz as ``diffusion-pl predict`` writes it (``samples`` uint8 N x H x W x C, ``labels``, ``prompts``)
or a folder of images. FID, KID, the Inception Score and precision/recall are computed in the features of the FID
Inception-v3 (``inception``) and/or of a framework-trained classifier (``domain``), against a reference given as a
data source, an image folder or a statistics file that an earlier run saved. See :mod:`diffusion_pl.metrics.frechet`
for how these numbers depend on the number of samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion_pl.core.errors import InputShapeError, UserError
from diffusion_pl.data import ImageFolder, ImageFormat
from diffusion_pl.data.image_files import ImageFileSet, read_image_files
from diffusion_pl.metrics.clip_score import clip_score
from diffusion_pl.metrics.domain import ClassifierFeatures
from diffusion_pl.metrics.extractor import FeatureExtractor
from diffusion_pl.metrics.feature_reference import DEFAULT_KEEP, FeatureReference
from diffusion_pl.metrics.features import extract_features
from diffusion_pl.metrics.inception import InceptionFeatures
from diffusion_pl.metrics.inception_score import inception_score
from diffusion_pl.metrics.on_target import on_target, target_labels
from diffusion_pl.metrics.real_data import RealData
from diffusion_pl.metrics.scoring import RealReference
from diffusion_pl.metrics.statistics_file import load_statistics, save_statistics
from diffusion_pl.nets.classifier import EncoderClassifier, load_classifier_net
from diffusion_pl.nets.clip import load_clip


class EvaluationError(UserError, ValueError):
    """A request the scorer cannot serve (no metric chosen, a metric without what it needs); the message says what to
    add."""


@dataclass(frozen=True)
class Request:
    """What to score and how.

    Attributes:
        samples: The samples: an .npz (``samples`` or ``images``, optional ``labels``, ``prompts``) or a folder.
        reference: Real images: a data source part (``FashionMNIST`` or ``diffusion_pl.data.FashionMNIST:train``, a
            YAML spec with its arguments; default split test), an image folder, or a statistics .npz
            (``save_reference`` of an earlier run, or pytorch-fid's mu/sigma).
        resize_mode: How real images are brought to the samples' size (``pad`` or ``resize``), as in the data config.
        held_out: Real images for the floor, as ``reference``; default the reference source's other split.
        save_reference: Write the reference statistics of every feature space used to this .npz.
        inception: Score in the FID Inception-v3's features (FID; KID, precision/recall with their flags).
        inception_weights: Local Inception weights file (offline); None downloads them once.
        domain: A ClassifierModule checkpoint whose features give the domain FID (and KID, precision/recall).
        kid: KID (Binkowski et al. 2018) in each feature space.
        inception_score: The Inception Score (Salimans et al. 2016); needs ``inception``.
        precision_recall: Improved precision and recall (Kynkäänniemi et al. 2019) in each feature space.
        floor: The real-data floor: FID of as many held-out real images as samples, in each feature space.
        on_target: A ClassifierModule checkpoint: the share of samples it puts in their target class.
        labels: Target classes cycled over the samples, for an .npz without ``labels``.
        clip: A CLIPModule checkpoint, clip file or released model name: the CLIP score of samples with prompts.
        keep: Real features kept for KID and precision/recall.
        kid_subsets: KID's subsets.
        kid_subset_size: Features per KID subset (capped by both counts).
        is_splits: Splits of the Inception Score.
        k: The neighbour of precision/recall's k-NN balls.
        batch_size: Images per network batch.
        device: Where the networks run.
        seed: Seed of every random subset (KID, IS, precision/recall, held-out images).
    """

    samples: str
    reference: str | None = None
    resize_mode: str = "pad"
    held_out: str | None = None
    save_reference: str | None = None
    inception: bool = False
    inception_weights: str | None = None
    domain: str | None = None
    kid: bool = False
    inception_score: bool = False
    precision_recall: bool = False
    floor: bool = False
    on_target: str | None = None
    labels: tuple[int, ...] | None = None
    clip: str | None = None
    keep: int = DEFAULT_KEEP
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    is_splits: int = 10
    k: int = 3
    batch_size: int = 250
    device: str = "cpu"
    seed: int = 0


@dataclass(frozen=True)
class Evaluation:
    """The scores of one sample set.

    Attributes:
        metrics: Name -> value, in the order computed: ``<space>/fid``, ``<space>/fid_floor``, ``<space>/kid``,
            ``<space>/kid_std``, ``<space>/precision``, ``<space>/recall``, ``inception/is``, ``inception/is_std``
            (space ``inception`` or ``domain``), ``on_target``, ``clip_score``.
        details: Per-class on-target shares (``on_target_per_class``).
        settings: The request, the sample count and shape, and the reference actually used.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def _check(request: Request) -> None:
    """Refuse a request without a metric, or with a metric that lacks what it needs."""
    spaces = request.inception or request.domain is not None
    if not (spaces or request.on_target or request.clip):
        raise EvaluationError("no metric chosen: add --inception and/or --domain CLASSIFIER.ckpt (FID; with --kid, "
                              "--precision-recall, --floor), --on-target CLASSIFIER.ckpt or --clip CLIP")
    if (request.kid or request.precision_recall or request.floor) and not spaces:
        raise EvaluationError("--kid, --precision-recall and --floor need a feature space: add --inception or "
                              "--domain CLASSIFIER.ckpt")
    if request.inception_score and not request.inception:
        raise EvaluationError("the Inception Score needs the Inception network: add --inception")
    if request.save_reference and (request.reference is None or request.reference.endswith(".npz")):
        raise EvaluationError("--save-reference writes the statistics of real images: give them as --reference "
                              "SOURCE[:SPLIT] or an image folder (the reference given is already a statistics file)")
    if spaces and request.reference is None:
        raise EvaluationError("FID needs real images to compare with: add --reference SOURCE[:SPLIT] (e.g. "
                              "FashionMNIST:test), an image folder or a statistics .npz")


def real_data(text: str, image_format: ImageFormat) -> RealData:
    """A reference or held-out argument as real data: an image folder (its test split where it has train/ and
    test/, else all of it), or ``SOURCE[:SPLIT]`` (see :meth:`RealData.from_text`)."""
    path = Path(text).expanduser()
    if path.is_dir():
        split = "test" if (path / "train").is_dir() and (path / "test").is_dir() else "train"
        return RealData(ImageFolder(str(path)), split, image_format)
    try:
        return RealData.from_text(text, image_format)
    except (ValueError, TypeError) as error:
        raise EvaluationError(f"{text!r} is neither an image folder, a statistics .npz nor SOURCE[:SPLIT] with a "
                              f"data source part (e.g. FashionMNIST:test, or '{{class_path: diffusion_pl.data."
                              f"Torchvision, init_args: {{name: CIFAR10}}}}:test') and split train or test: "
                              f"{error}") from error


def _format(request: Request, files: ImageFileSet) -> ImageFormat:
    """The real images' format: the samples' size and channels, fitted as ``request.resize_mode`` says."""
    _, channels, height, _ = files.images.shape
    return ImageFormat(height, channels, request.resize_mode)  # type: ignore[arg-type]


def _extractors(request: Request, files: ImageFileSet) -> dict[str, FeatureExtractor]:
    """The feature spaces of the request, by name, on the request's device."""
    extractors: dict[str, FeatureExtractor] = {}
    if request.inception:
        extractors["inception"] = InceptionFeatures(request.inception_weights)
    if request.domain is not None:
        domain = ClassifierFeatures(request.domain)
        _check_fits(domain.net, files.images, request.domain)
        extractors["domain"] = domain
    return {name: extractor.to(request.device) for name, extractor in extractors.items()}


def _check_fits(net: EncoderClassifier, images: Tensor, path: str) -> None:
    """Refuse samples of another size or channel count than the classifier ``net`` takes."""
    expected = (net.in_channels, net.image_size, net.image_size)
    if tuple(images.shape[1:]) != expected:
        raise InputShapeError(f"the samples are {tuple(images.shape[1:])} (C, H, W) but the classifier {path} takes "
                              f"{expected}: score them with a classifier trained on images of their size")


def _references(request: Request, files: ImageFileSet, extractors: dict[str, FeatureExtractor]
                ) -> tuple[dict[str, FeatureReference], dict[str, Any]]:
    """The reference of each feature space (loaded from a statistics file or computed from real images) and its
    description."""
    assert request.reference is not None
    _, channels, height, width = files.images.shape
    if request.reference.endswith(".npz"):
        references, meta = load_statistics(request.reference)
        size = meta.get("image_format", {})
        if size.get("image_size", height) != height or size.get("channels", channels) != channels:
            raise InputShapeError(f"{request.reference} holds statistics of {size['channels']} x {size['image_size']}"
                                  f" x {size['image_size']} images, the samples are {channels} x {height} x {width}: "
                                  "compute a reference at the samples' size (--reference SOURCE)")
        _check_spaces(request.reference, references, extractors)
        return {name: references[name] for name in extractors}, {"statistics": request.reference, **meta}
    if height != width:
        raise InputShapeError(f"the samples are {height} x {width}: real references are square; give square samples")
    data = real_data(request.reference, _format(request, files))
    images = data.load().images
    references = {name: FeatureReference.of_images(extractor, images, request.keep, request.seed, request.batch_size)
                  for name, extractor in extractors.items()}
    meta = {**data.describe(), "num_images": len(images), "keep": request.keep}
    if request.save_reference:
        save_statistics(request.save_reference, references, meta)
    return references, meta


def _check_spaces(path: str, references: dict[str, FeatureReference], extractors: dict[str, FeatureExtractor]) -> None:
    """Refuse a statistics file without a space the request scores in, or written with other extractor weights."""
    for name, extractor in extractors.items():
        if name not in references:
            raise EvaluationError(f"{path} has no {name!r} statistics (it has {', '.join(sorted(references))}): "
                                  f"write them with --save-reference and --{name}, or give the data source")
        fingerprint = references[name].fingerprint
        if fingerprint is not None and fingerprint != extractor.fingerprint():
            raise EvaluationError(f"{path} holds {name!r} statistics of another {extractor.name} network than the one "
                                  "given: compute the reference again with this network (--reference SOURCE "
                                  "--save-reference FILE), or give the network the file was made with")


def _held_out(request: Request, meta: dict[str, Any], files: ImageFileSet) -> Tensor:
    """A seeded random subset of held-out real images, as many as samples: those of ``held_out``, else the other split
    of the reference source."""
    if request.held_out is not None:
        data = real_data(request.held_out, _format(request, files))
    elif "source" in meta:
        data = RealData.from_description(meta).other_split()
    else:
        raise EvaluationError("--floor needs held-out real images: add --held-out SOURCE[:SPLIT] or an image folder")
    images = data.load().images
    num = len(files.images)
    if len(images) < num:
        raise EvaluationError(f"--floor needs {num} held-out real images, {type(data.source).__name__} {data.split} has "
                              f"{len(images)}: give a larger --held-out set or score fewer samples")
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(request.seed))[:num]]


def _space_metrics(name: str, scorer: RealReference, files: ImageFileSet, request: Request) -> dict[str, float]:
    """FID (and floor, KID, precision/recall, IS as requested) of the samples in one feature space."""
    features = extract_features(scorer.extractor, files.images, request.batch_size)
    values = {f"{name}/fid": scorer.fid_of_features(features.features)}
    if request.floor:
        values[f"{name}/fid_floor"] = scorer.floor(len(files.images))
    if request.kid:
        values[f"{name}/kid"], values[f"{name}/kid_std"] = scorer.kid(
            features.features, request.kid_subsets, request.kid_subset_size, request.seed)
    if request.precision_recall:
        values[f"{name}/precision"], values[f"{name}/recall"] = scorer.precision_recall(
            features.features, request.k, request.seed)
    if request.inception_score and features.logits is not None:
        values[f"{name}/is"], values[f"{name}/is_std"] = inception_score(features.logits, request.is_splits,
                                                                         request.seed)
    return values


def evaluate(request: Request) -> Evaluation:
    """Score the request's samples with every metric it selects.

    Raises:
        UserError: Missing or malformed files, a metric without what it needs, samples of another size than the
            reference or the classifier; the message says how to fix it.
    """
    _check(request)
    files = read_image_files(request.samples, "samples")
    targets = None
    if request.on_target:
        targets = target_labels(files.labels, request.labels, len(files.images), request.samples)
    if request.clip and files.prompts is None:
        raise EvaluationError(f"{request.samples} has no 'prompts' array: the CLIP score compares each sample with its "
                              "prompt (predict writes them for text-conditional and CLIP-guided models)")
    evaluation = Evaluation(settings={**asdict(request), "num_samples": len(files.images),
                                      "image_shape": list(files.images.shape[1:])})
    extractors = _extractors(request, files)
    if extractors:
        references, meta = _references(request, files, extractors)
        evaluation.settings["reference"] = meta
        held_out = _held_out(request, meta, files) if request.floor else None
        for name, extractor in extractors.items():
            scorer = RealReference(extractor, references[name], held_out, request.batch_size)
            evaluation.metrics.update(_space_metrics(name, scorer, files, request))
    if request.on_target and targets is not None:
        net = load_classifier_net(request.on_target).to(request.device)
        _check_fits(net, files.images, request.on_target)
        result = on_target(net, files.images, targets, request.batch_size)
        evaluation.metrics["on_target"] = result.share
        evaluation.details["on_target_per_class"] = result.per_class
    if request.clip and files.prompts is not None:
        net = load_clip(request.clip).to(request.device)
        evaluation.metrics["clip_score"] = clip_score(net, files.images, list(files.prompts), request.batch_size)
    return evaluation
