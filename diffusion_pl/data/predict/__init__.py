"""PredictInput parts, named in ``data.init_args.predict``: :class:`Seeds` (sampling), :class:`SplitImages` (images
of a split) and :class:`ImageFiles` (the user's own images)."""

from diffusion_pl.data.predict.base import PredictData, PredictInput
from diffusion_pl.data.predict.image_files import ImageFiles, PredictInputError, load_predict_images
from diffusion_pl.data.predict.seeds import SeedDataset, Seeds
from diffusion_pl.data.predict.split_images import PredictImageDataset, SplitImages

__all__ = ["ImageFiles", "PredictData", "PredictImageDataset", "PredictInput", "PredictInputError", "SeedDataset",
           "Seeds", "SplitImages", "load_predict_images"]
