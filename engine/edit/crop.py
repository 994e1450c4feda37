"""Compute only where the edit is (issue 23, lever 2): the fused editor's inversion and decoding on a crop of
the latent around the masks, pasted back into the clean image latent.

Why it is allowed. The fused decoding (paper.denoise_masked) replaces every cell outside the masks by the
inverted latent at every step, and its last step fuses with the level-0 latent, z0 itself: where every
weight is 0 the full-frame result is z0 bit for bit (kernels.fusion: 0 + 1·bg). So outside the masks the
UNet's output over the full frame is thrown away. What the crop changes is the context the UNet sees inside
the masks: convolutions see `margin` cells of real neighbourhood and then the crop's border, and attention
is global, so the tokens beyond the crop no longer take part. A crop that covers the whole latent is the
full-frame computation exactly; a smaller one is an approximation whose quality the shapes suite measures
(benchmarks/shapes_quality.py, rows crop0..crop4).

The box (crop_box) is one for the whole batch and every pair: the bounding box of the union of all masks'
nonzero cells, so the crops batch as one UNet call of one size, as the full frame did. It grows by `margin`
cells per side, each side is rounded up to the UNet's size multiple (2 ** (down blocks - 1): a down-sampled
side must stay an integer), it is shifted to stay inside the latent, and clamped to it when it would not fit.
Each crop size is a new UNet input shape: under torch.compile or CUDA graphs a recompile or a capture; the
rounding to the size multiple bounds how many sizes there are.

SD-XL: toolkit.run_unet gives the UNet the time_ids of the latent it is called on, so on a crop they state
the crop's size (original = target = the crop in pixels, crop offset 0): the model is told it draws a picture
of the crop's size, which is what it then does. Rectified-flow models are refused (regions.edit_many): SD 3's
position table is indexed by the patch grid, so a crop would move every token's position.
"""
from dataclasses import dataclass

import torch



@dataclass(frozen=True)
class Box:
    top: int
    left: int
    height: int
    width: int

    def slices(self) -> tuple:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    @property
    def cells(self) -> int:
        return self.height * self.width


def size_multiple(m) -> int:
    """The latent side multiple the UNet down-samples cleanly: 2 ** (down blocks − 1) (SD 1.5: 8)."""
    return 2 ** (len(m.unet.config.down_block_types) - 1)


def _span(lo: int, hi: int, margin: int, multiple: int, n: int) -> tuple:
    """(start, length) on an axis of n cells: [lo, hi) grown by margin per side, its length rounded up to
    `multiple` (the extra split around it), shifted inside [0, n), the whole axis when it does not fit."""
    size = hi - lo + 2 * margin
    size = -(-size // multiple) * multiple
    if size >= n:
        return 0, n
    start = lo - margin - (size - (hi - lo + 2 * margin)) // 2
    return min(max(start, 0), n - size), size


def crop_box(masks: torch.Tensor, margin: int, multiple: int) -> Box | None:
    """The crop of masks (B, N, h, w) (module docstring): one Box for every image and pair, or None where no
    mask has a nonzero cell (there is nothing to edit)."""
    if masks.ndim != 4:
        raise ValueError(f"masks must be (B, N, h, w), got shape {tuple(masks.shape)}")
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ValueError(f"crop margin must be an integer >= 0, got {margin!r}")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"size multiple must be an integer >= 1, got {multiple!r}")
    union = (masks != 0).flatten(0, 1).any(0)  # (h, w)
    rows, cols = union.any(1).nonzero()[:, 0], union.any(0).nonzero()[:, 0]
    if not len(rows):
        return None
    h, w = union.shape
    top, height = _span(int(rows[0]), int(rows[-1]) + 1, margin, multiple, h)
    left, width = _span(int(cols[0]), int(cols[-1]) + 1, margin, multiple, w)
    return Box(top, left, height, width)
