"""A folder of images: ``root/<class>/<image>`` (or a flat folder = one class; or ``root/train`` and ``root/test``
each holding such a tree, which gives an official test split); ``<image>.txt`` beside an image is its caption."""

from __future__ import annotations

from pathlib import Path

import torch

from diffusion_pl.data.format import IMAGE_EXTENSIONS, ImageFormat
from diffusion_pl.data.images import ImageData, Images, LazyImageFolder
from diffusion_pl.data.sources.base import DatasetNotFoundError, ImageSource, Split, with_absolute_path


class ImageFolder(ImageSource):
    """Any folder of images, one subfolder per class, each image fitted to the format (resized and center-cropped,
    or padded).

    Args:
        root: The folder.
        lazy: Decode each file when it is read, in the loader workers, instead of the whole split into memory at setup
            (large folders; in memory is faster for small ones).
        captions: Read ``<image>.txt`` beside an image as its caption (else captions come from class names).
    """

    def __init__(self, root: str, lazy: bool = False, captions: bool = True) -> None:
        self.root, self.lazy, self.captions = root, lazy, captions

    def class_names(self) -> tuple[str, ...]:
        path = self._path()
        folder = path / "train" if _has_split_dirs(path) else path
        return tuple(_classes(folder)[0])

    def load(self, split: Split, image_format: ImageFormat) -> Images | None:
        found = self._files(split)
        if found is None:
            return None
        files, labels, names = found
        label_tensor = torch.tensor(labels, dtype=torch.int64)
        captions = _captions(files) if self.captions else None
        if self.lazy:
            return LazyImageFolder(tuple(files), label_tensor, names, captions, image_format)
        images = torch.empty((len(files), *image_format.shape), dtype=torch.uint8)  # no second copy
        for index, path in enumerate(files):
            images[index] = image_format.decode(path)
        return ImageData(images, label_tensor, names, captions)

    def identity(self) -> dict:
        return with_absolute_path(super().identity(), "root")

    def _path(self) -> Path:
        path = Path(self.root).expanduser()
        if not path.is_dir():
            raise DatasetNotFoundError(
                f"image folder root {str(path)!r} does not exist or is not a folder; pass "
                "`--data.init_args.source.root=` an existing folder of images (one subfolder per class, or a flat "
                "folder of images for a single class)")
        return path

    def _files(self, split: Split) -> tuple[list[Path], list[int], tuple[str, ...]] | None:
        """The image files of ``split``, their labels and the class names (None: the folder has no test split)."""
        path = self._path()
        if _has_split_dirs(path):
            names, folder = self.class_names(), path / split
        elif split == "test":
            return None
        else:
            names, folder = None, path
        found_names, files = _classes(folder)
        names = tuple(names or found_names)
        index = {name: i for i, name in enumerate(names)}
        paths, labels = [], []
        for name, class_files in zip(found_names, files):
            if name not in index:
                raise ValueError(f"class folder {name!r} in {str(folder)!r} has no counterpart in "
                                 f"{str(path / 'train')!r}")
            paths += class_files
            labels += [index[name]] * len(class_files)
        return paths, labels, names


def _has_split_dirs(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is a visible file with an image suffix (:data:`IMAGE_EXTENSIONS`)."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _classes(folder: Path) -> tuple[list[str], list[list[Path]]]:
    """Class names and the image files of each class under ``folder``: its sorted subfolders holding images (anywhere
    below them), else the folder itself as one class."""
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    dirs = [d for d in subdirs if any(is_image_file(p) for p in d.rglob("*"))]
    if dirs:
        return [d.name for d in dirs], [sorted(p for p in d.rglob("*") if is_image_file(p)) for d in dirs]
    files = sorted(p for p in folder.iterdir() if is_image_file(p))
    if not files:
        raise DatasetNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {str(folder)!r}; put images in one subfolder per "
            "class (or directly in the folder for a single class), or point `--data.init_args.source.root=` at the "
            "right folder")
    return [folder.name or "images"], [files]


def read_caption(image_path: Path) -> str | None:
    """The caption of an image file: the text of ``<image>.txt`` beside it (stripped), or None without one."""
    path = image_path.with_suffix(".txt")
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def _captions(files: list[Path]) -> tuple[str, ...] | None:
    """Each file's caption (empty where it has none), or None when no file has a caption."""
    captions = [read_caption(path) for path in files]
    return None if all(c is None for c in captions) else tuple(c or "" for c in captions)
