"""Batch augmentation on uint8 image tensors (CPU or GPU), seeded by a CPU ``torch.Generator``.

Two regimes:

- ``crop=None`` (small images, e.g. the embedded 32-px dataset): random crop with
  zero padding + horizontal flip, at the input size.
- ``crop=int`` (images decoded once at a fixed size S, e.g. 256): training takes a
  per-sample RandomResizedCrop to crop×crop + horizontal flip, evaluation the
  central crop×crop (for S=256, crop=224 that is the usual Resize(256) + CenterCrop(224)).

With the image cache's geometry (``widths``, ``transposed``: see
:class:`~study.data.images.ImageCache`) each image is its valid region S × w_i (columns
[0, w_i), the rest is padding), and transposed ones are transposed back: training
boxes follow torchvision's rule on the whole original image and evaluation is its
Resize(S) + CenterCrop(crop). Without it, the whole H × W array is the image.

Every op is batched on the images' device; random numbers are drawn on the CPU
from ``generator`` (only a few per image) and then moved, so a seed gives the same
augmentation on any device. The output is float, normalised with the ImageNet mean and std.

On a GPU a batch never makes the host wait for the device: what a batch's draws and geometry
send there (boxes, flips, offsets, orientation) goes as one packed tensor through pinned memory
without blocking (:func:`send`), index ranges are made on the device, and the normalisation's
constants are copied there once per process.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many boxes before its central fallback


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or float-in-[0, 255] (B, 3, H, W) → float, normalised with the ImageNet mean and std."""
    x = images.float().div_(255) if images.dtype == torch.uint8 else images / 255
    mean, std = _mean_std(x.device)
    return (x - mean) / std


@functools.cache
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD on ``device``, copied there once per process: a copy per batch would be a host-to-device
    transfer from pageable memory, which waits for the device, on every step."""
    return MEAN.to(device), STD.to(device)


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The CPU tensor ``host`` on ``device``. To a GPU through pinned memory and ``non_blocking``: the copy is
    queued behind the work already sent and the host goes on (a copy from pageable memory would wait for the
    device to finish that work first); PyTorch's pinned-memory cache keeps the staging buffer until the copy
    is done. Pinning needs CUDA, so any other device gets a plain copy (none on the CPU), and so does a tensor
    that is not on the CPU."""
    device = torch.device(device)
    if device.type != "cuda" or host.device.type != "cpu":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def send(device: torch.device, *parts: torch.Tensor) -> list[torch.Tensor]:
    """CPU tensors of n rows each (shape (n,) or (n, k); integer or bool) on ``device`` in one copy: packed as
    int64 columns (:func:`pack`), sent with :func:`to_device`, split back on the device with their shapes and
    dtypes (:func:`unpack`). One transfer per batch instead of one per tensor. On the CPU they are returned as
    they are."""
    if device.type == "cpu":
        return list(parts)
    return unpack(to_device(pack(*parts), device), *parts)


def pack(*parts: torch.Tensor) -> torch.Tensor:
    """Tensors of n rows each (integer or bool) side by side as one int64 (n, k₁ + k₂ + …) tensor."""
    return torch.cat([part.reshape(len(part), math.prod(part.shape[1:])).long() for part in parts], dim=1)


def unpack(packed: torch.Tensor, *like: torch.Tensor) -> list[torch.Tensor]:
    """:func:`pack`'s inverse: ``packed``'s columns cut back into tensors shaped and typed like ``like``."""
    out, start = [], 0
    for part in like:
        width = math.prod(part.shape[1:])
        out.append(packed[:, start : start + width].reshape(part.shape).to(part.dtype))
        start += width
    return out


def eval_transform(
    images: torch.Tensor,
    crop: int | None = None,
    widths: torch.Tensor | None = None,
    transposed: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 (B, 3, H, W) → normalised float; with ``crop``, the central crop×crop first (torchvision's CenterCrop
    placement: offsets rounded from (size - crop) / 2).

    With ``widths`` (B,) the crop is centred in each image's valid region H × w_i (columns [0, w_i)), and images
    ``transposed`` (bool, B) are transposed back: Resize(H) + CenterCrop(crop) of the original image. ``crop=None``
    ignores the geometry (the whole array)."""
    if crop is None:
        return normalize(images)
    b, c, h, w = images.shape
    if widths is None:
        _check_crop(crop, h, w)
        top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
        return normalize(images[..., top : top + crop, left : left + crop])
    widths = _check_widths(widths, b, w)
    _check_crop(crop, h, int(widths.min()) if b else crop)
    top = int(round((h - crop) / 2.0))
    left = ((widths - crop).double() / 2).round().long()  # round half to even, like Python's round
    left, swap = send(images.device, left, _mask(transposed, b, torch.device("cpu")))  # one copy for both
    cols = left[:, None] + torch.arange(crop, device=images.device)  # the column ranges are made on the device
    out = images[:, :, top : top + crop].gather(3, cols[:, None, None, :].expand(b, c, crop, crop))
    if transposed is not None:
        out = torch.where(swap[:, None, None, None], out.transpose(-1, -2), out)
    return normalize(out)


def train_transform(
    images: torch.Tensor,
    generator: torch.Generator,
    pad: int = 2,
    crop: int | None = None,
    scale: tuple[float, float] = (0.16, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    widths: torch.Tensor | None = None,
    transposed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random crop + horizontal flip per sample, then normalise; deterministic for the state of ``generator``.

    ``crop=None``: a random H×W window of the image zero-padded by ``pad`` px (``scale``/``ratio`` unused; the
    geometry is ignored). ``crop=int``: RandomResizedCrop to crop×crop with boxes from :func:`sample_crop_boxes`
    (``pad`` unused). With ``widths`` (B,) each box lies in its image's valid region H × w_i, and for images
    ``transposed`` (bool, B) it is drawn on the original (transposed back) image and the output is transposed back:
    the same box and output as for the untransposed image. The draws per image are fixed whatever the geometry.
    """
    if crop is None:
        return _pad_crop_flip(images, generator, pad)
    b, _, h, w = images.shape
    if crop <= 0:
        raise ValueError(f"crop must be a positive size, got {crop}")
    if widths is None:
        boxes = sample_crop_boxes(b, h, w, generator, scale, ratio)
        flips = torch.rand(b, generator=generator) < 0.5
        boxes, flips = send(images.device, boxes, flips)
        return normalize(crop_and_resize(images.float(), boxes, crop, flips))
    widths = _check_widths(widths, b, w)
    swap = _mask(transposed, b)
    heights = torch.full_like(widths, h)
    # boxes on the original images (transposed back), then in the stored orientation: (left, top, w, h)
    original = torch.where(swap, widths, heights), torch.where(swap, heights, widths)
    boxes = sample_crop_boxes(b, *original, generator, scale, ratio)
    boxes = torch.where(swap[:, None], boxes[:, [1, 0, 3, 2]], boxes)
    flips = torch.rand(b, generator=generator) < 0.5
    used = int(widths.max()) if b else w  # the padding right of every box is never read: not converted either
    boxes, flips, swap = send(images.device, boxes, flips, swap)  # one copy for the three
    return normalize(crop_and_resize(images[..., :used].float(), boxes, crop, flips, swap))


def sample_crop_boxes(
    n: int,
    height: int | torch.Tensor,
    width: int | torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.16, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """``n`` RandomResizedCrop boxes as int64 (top, left, height, width) rows, torchvision's rule vectorised.

    ``height`` and ``width``: the image size, one for all boxes or one per box (int64 tensors (n,)).
    Per box: up to 10 attempts of an area fraction uniform in ``scale`` and an aspect ratio (w/h) log-uniform in
    ``ratio``, sides rounded; the first attempt that fits the image is placed uniformly at random. If none fits,
    the central fallback: the whole image, cut to the nearest bound of ``ratio`` when its own ratio is outside.
    All attempts are drawn for every box (a fixed number of draws per call), so boxes differ from torchvision's
    for the same seed but follow the same distribution.
    """
    height = torch.as_tensor(height, dtype=torch.long).expand(n)
    width = torch.as_tensor(width, dtype=torch.long).expand(n)
    area = torch.empty(n, ATTEMPTS).uniform_(scale[0], scale[1], generator=generator) * (height * width)[:, None]
    log_ratio = torch.empty(n, ATTEMPTS).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    w = (area * aspect).sqrt().round().long()
    h = (area / aspect).sqrt().round().long()
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first attempt that fits (0 when none does)
    h, w, found = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0], fits.any(dim=1)
    fallback_h, fallback_w = _central_fallback(height, width, ratio)
    h = torch.where(found, h, fallback_h)
    w = torch.where(found, w, fallback_w)
    position = torch.rand(n, 2, generator=generator)
    top = torch.where(found, _uniform_offset(position[:, 0], height - h), (height - h) // 2)
    left = torch.where(found, _uniform_offset(position[:, 1], width - w), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def crop_and_resize(
    images: torch.Tensor,
    boxes: torch.Tensor,
    size: int,
    flips: torch.Tensor | None = None,
    transposed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float (B, C, H, W) and one (top, left, height, width) box per image → (B, C, size, size), in one batched op;
    ``transposed`` (bool, B) transposes the chosen outputs, then ``flips`` (bool, B) mirrors the chosen ones
    horizontally.

    One ``grid_sample`` at the coordinates of a bilinear resize of each box (half-pixel centres, clamped to the
    box's edge pixels, no antialiasing), which is ``resized_crop(..., antialias=False)``: pixels outside a box never
    leak in. Without antialias a downscale aliases, but here it is at most S / crop (256 / 224 ≈ 1.14): negligible.
    ``boxes``, ``flips`` and ``transposed`` may be on the CPU (copied) or already on the images' device (the
    transforms send them there in one copy: :func:`send`).
    """
    b, _, height, width = images.shape
    top, left, h, w = boxes.to(device=images.device, dtype=images.dtype).unbind(1)
    ys = top[:, None] + _resize_coordinates(h, size)  # (B, size) source rows, in pixels
    xs = left[:, None] + _resize_coordinates(w, size)
    # grid_sample with align_corners=True maps -1 and 1 to the centres of the first and last pixels.
    xs, ys = 2 * xs / max(width - 1, 1) - 1, 2 * ys / max(height - 1, 1) - 1
    # output pixel (i, j) samples (ys[i], xs[j]); transposed, (ys[j], xs[i]): "across" is what j indexes
    swap = _mask(transposed, b, images.device)[:, None]
    across, down = torch.where(swap, ys, xs), torch.where(swap, xs, ys)
    if flips is not None:
        across = torch.where(flips.to(images.device)[:, None], across.flip(1), across)
    across, down = torch.broadcast_tensors(across[:, None, :], down[:, :, None])
    swap = swap[:, :, None]
    grid = torch.stack([torch.where(swap, down, across), torch.where(swap, across, down)], dim=-1)  # (x, y)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _resize_coordinates(length: torch.Tensor, size: int) -> torch.Tensor:
    """Where each of ``size`` output pixels samples a box of ``length`` px (per row): PyTorch's bilinear rule
    (dst + 0.5) · length / size − 0.5, clamped to [0, length − 1] as when the box is cropped out first."""
    steps = (torch.arange(size, device=length.device, dtype=length.dtype) + 0.5) / size
    return torch.minimum((steps * length[:, None] - 0.5).clamp(min=0), length[:, None] - 1)


def _central_fallback(
    height: torch.Tensor, width: torch.Tensor, ratio: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's box when no attempt fits: the whole image, or its centre cut to the nearest allowed ratio
    (in float64 and rounded half to even, as torchvision computes it in Python)."""
    low, high = min(ratio), max(ratio)
    in_ratio = width.double() / height.double()
    tall, wide = in_ratio < low, in_ratio > high
    h = torch.where(tall, (width.double() / low).round().long(), height)
    w = torch.where(wide, (height.double() * high).round().long(), width)
    return h, w


def _uniform_offset(u: torch.Tensor, max_offset: torch.Tensor) -> torch.Tensor:
    """An integer uniform in [0, max_offset] per row from u uniform in [0, 1) (clamped: u·(m+1) can round up)."""
    return torch.minimum((u * (max_offset + 1)).long(), max_offset.clamp(min=0))


def _mask(transposed: torch.Tensor | None, n: int, device: torch.device | None = None) -> torch.Tensor:
    """``transposed`` as a bool tensor (n,) on ``device``; all False when None."""
    if transposed is None:
        return torch.zeros(n, dtype=torch.bool, device=device)
    return torch.as_tensor(transposed, dtype=torch.bool).reshape(n).to(device)


def _check_widths(widths: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """``widths`` as an int64 CPU tensor (n,), each valid width between 1 and the array's ``width``."""
    widths = torch.as_tensor(widths, dtype=torch.long).cpu().reshape(n)
    if n and not (0 < int(widths.min()) and int(widths.max()) <= width):
        raise ValueError(f"valid widths must be between 1 and the images' width {width}")
    return widths


def _check_crop(crop: int, height: int, width: int) -> None:
    if not 0 < crop <= min(height, width):  # evaluation never upsamples: images are decoded at S ≥ crop
        raise ValueError(f"crop {crop} must be between 1 and the image size {height}×{width}")


def _pad_crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int) -> torch.Tensor:
    """Per-sample random crop (zero padding of ``pad`` px) and horizontal flip at the input size."""
    b, _, h, w = images.shape
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5
    x = F.pad(normalize(images), (pad, pad, pad, pad))
    offsets, flips = send(x.device, offsets, flips)  # one copy; the index ranges are made on the device
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
