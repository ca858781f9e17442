"""How visible the border of an inpainted region is."""

from __future__ import annotations

from torch import Tensor


def seam_energy(images: Tensor, masks: Tensor) -> Tensor:
    """Per image, the mean squared difference of the neighbouring pixel pairs (horizontal and vertical) that straddle
    the mask border, one pixel known and one filled in: the gradient energy across the seam.

    Args:
        images: (B, C, H, W), any range (compare images of one range).
        masks: (B or 1, 1, H, W), 1 known and 0 filled in.

    Returns:
        (B,) energies (0 for an image whose mask has no border).
    """
    x, known = images.double(), masks.bool().expand(images.shape[0], 1, *images.shape[-2:])
    total = x.new_zeros(images.shape[0])
    count = x.new_zeros(images.shape[0])
    for dim in (-1, -2):
        size = x.shape[dim]
        diff = x.narrow(dim, 1, size - 1) - x.narrow(dim, 0, size - 1)
        crossing = (known.narrow(dim, 1, size - 1) != known.narrow(dim, 0, size - 1)).double()
        total += (diff**2 * crossing).sum(dim=(1, 2, 3))
        count += crossing.sum(dim=(1, 2, 3)) * images.shape[1]
    return total / count.clamp(min=1)
