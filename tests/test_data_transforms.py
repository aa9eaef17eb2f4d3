"""Tensor augmentation: pad-crop-flip for small images, batched RandomResizedCrop / center crop for decoded ones.

torchvision is the oracle: its ``resized_crop`` (bilinear, no antialias) for the resize, its
``RandomResizedCrop.get_params`` for the box distribution and fallback, its ``center_crop`` for evaluation.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from study.data import transforms
from study.data.transforms import (
    MEAN,
    STD,
    crop_and_resize,
    eval_transform,
    normalize,
    pack,
    sample_crop_boxes,
    send,
    to_device,
    train_transform,
    unpack,
)

SCALE, RATIO = (0.16, 1.0), (3 / 4, 4 / 3)


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_train_transform_is_a_flipped_or_shifted_crop():
    images = _images(16, 8, 8)
    plain = eval_transform(images)
    assert plain.shape == images.shape and abs(plain.mean()) < 1.5
    out = train_transform(images, torch.Generator().manual_seed(0), pad=0)
    flipped = [torch.equal(o, p.flip(-1)) and not torch.equal(o, p) for o, p in zip(out, plain, strict=True)]
    assert all(torch.equal(o, p) or f for o, p, f in zip(out, plain, flipped, strict=True)) and 0 < sum(flipped) < 16
    shifted = train_transform(images, torch.Generator().manual_seed(0), pad=2)
    padded = torch.nn.functional.pad(plain, (2, 2, 2, 2))
    for o, p in zip(shifted, padded, strict=True):  # every output is an 8×8 window of the padded image, maybe flipped
        windows = [p[:, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(o, w) or torch.equal(o, w.flip(-1)) for w in windows)


@pytest.mark.parametrize(("h", "w", "crop"), [(256, 256, 224), (255, 250, 224), (40, 41, 1)])
def test_eval_crop_is_torchvisions_center_crop(h, w, crop):
    images = _images(3, h, w)
    out = eval_transform(images, crop)
    assert out.shape == (3, 3, crop, crop) and out.dtype == torch.float32
    torch.testing.assert_close(out, normalize(TF.center_crop(images, [crop, crop])), rtol=0, atol=0)
    if (h, w) == (256, 256):  # Resize(256) + CenterCrop(224): 16 px off every side
        torch.testing.assert_close(out, eval_transform(images[..., 16:240, 16:240]), rtol=0, atol=0)


def test_eval_crop_larger_than_the_images_is_an_error():
    with pytest.raises(ValueError, match="crop 300 must be between 1 and the image size 256×256"):
        eval_transform(_images(1, 256, 256), 300)


@pytest.mark.parametrize(
    "box",  # (top, left, height, width): upscale, downscale, non-square, whole image, one pixel, edge strips
    [(10, 20, 100, 130), (0, 0, 256, 256), (5, 7, 250, 200), (3, 4, 30, 17), (9, 9, 1, 1), (255, 100, 1, 156)],
)
def test_batched_crop_is_torchvisions_resized_crop(box):
    images = _images(2, 256, 256).float()
    out = crop_and_resize(images, torch.tensor([box, box]), 224, flips=torch.tensor([False, True]))
    expected = TF.resized_crop(images, *box, [224, 224], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
    torch.testing.assert_close(out[0], expected[0], rtol=0, atol=0.02)  # on a 0–255 scale
    torch.testing.assert_close(out[1], expected[1].flip(-1), rtol=0, atol=0.02)


def test_each_image_gets_its_own_box():
    images = _images(3, 64, 48).float()
    boxes = torch.tensor([[0, 0, 64, 48], [10, 5, 20, 30], [40, 30, 24, 18]])
    out = crop_and_resize(images, boxes, 16)
    for image, box, o in zip(images, boxes.tolist(), out, strict=True):
        expected = TF.resized_crop(image, *box, [16, 16], antialias=False)
        torch.testing.assert_close(o, expected, rtol=0, atol=0.02)


@pytest.mark.parametrize(("height", "width"), [(256, 256), (200, 300)])
def test_crop_boxes_respect_the_scale_and_ratio_bounds(height, width):
    boxes = sample_crop_boxes(20_000, height, width, torch.Generator().manual_seed(0), SCALE, RATIO)
    assert boxes.shape == (20_000, 4) and boxes.dtype == torch.int64
    top, left, h, w = boxes.T.double()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    # sides are rounded to whole pixels: the bounds hold for the unrounded sides, within half a pixel each
    assert ((h + 0.5) * (w + 0.5) >= SCALE[0] * height * width).all()
    assert ((h - 0.5) * (w - 0.5) <= SCALE[1] * height * width).all()
    assert ((w + 0.5) / (h - 0.5) >= RATIO[0]).all() and ((w - 0.5) / (h + 0.5) <= RATIO[1]).all()
    fraction = h * w / (height * width)
    assert fraction.min() < 0.17 and fraction.max() > 0.85  # the whole range is used (on 200×300 a 4:3 box ≤ 0.89)


def test_crop_boxes_follow_torchvisions_distribution():
    ours = sample_crop_boxes(4000, 256, 256, torch.Generator().manual_seed(0), SCALE, RATIO).double()
    torch.manual_seed(0)  # get_params draws from the global generator
    image = torch.empty(3, 256, 256)
    theirs = torch.tensor([RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)) for _ in range(4000)])
    torch.testing.assert_close(ours.mean(0), theirs.double().mean(0), rtol=0, atol=4.0)  # standard errors ~1 px
    torch.testing.assert_close(ours.std(0), theirs.double().std(0), rtol=0, atol=4.0)


@pytest.mark.parametrize(("height", "width"), [(256, 256), (100, 300), (300, 100), (120, 150)])
def test_crop_boxes_fall_back_to_torchvisions_central_crop(height, width):
    impossible = (2.0, 3.0)  # more than the image's area: no attempt fits
    boxes = sample_crop_boxes(5, height, width, torch.Generator().manual_seed(0), impossible, RATIO)
    expected = RandomResizedCrop.get_params(torch.empty(3, height, width), list(impossible), list(RATIO))
    assert boxes.tolist() == [list(expected)] * 5


def test_train_crop_is_a_normalised_resize_maybe_flipped():
    images = _images(8, 40, 40)
    out = train_transform(images, torch.Generator().manual_seed(0), crop=24, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert out.shape == (8, 3, 24, 24) and out.dtype == torch.float32
    resized = normalize(TF.resize(images.float(), [24, 24], antialias=False))  # the box is the whole image
    flipped = [(o - r.flip(-1)).abs().max() < 1e-3 for o, r in zip(out, resized, strict=True)]
    kept = [(o - r).abs().max() < 1e-3 for o, r in zip(out, resized, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and 0 < sum(flipped) < 8


def test_train_crop_flips_about_half_the_images():
    ramp = torch.arange(32, dtype=torch.uint8).expand(2000, 3, 32, 32)  # brighter to the right, unless flipped
    out = train_transform(ramp, torch.Generator().manual_seed(0), crop=16)
    flipped = out[:, 0, :, 0].mean(1) > out[:, 0, :, -1].mean(1)
    assert 0.45 < flipped.float().mean() < 0.55


def test_train_crop_is_deterministic_for_a_seed():
    images = _images(6, 64, 64)
    first = train_transform(images, torch.Generator().manual_seed(3), crop=32)
    assert torch.equal(first, train_transform(images, torch.Generator().manual_seed(3), crop=32))
    assert not torch.equal(first, train_transform(images, torch.Generator().manual_seed(4), crop=32))


@contextlib.contextmanager
def cuda_syncs() -> Iterator[list[str]]:
    """The calls inside that made the host wait for the device (torch's sync debug mode, as warnings); the
    list is filled when the block ends."""
    found: list[str] = []
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    found.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_train_crop_on_the_gpu_matches_the_cpu():
    """Both training paths (RandomResizedCrop; the small images' pad-crop) and the plain center crop, with the
    same draws as on the CPU, and not one wait for the device: their parameters go in one non-blocking copy."""
    images = _images(16, 256, 256)
    cuda = images.cuda()
    for options in ({"crop": 224}, {"pad": 2}):
        cpu = train_transform(images, torch.Generator().manual_seed(0), **options)
        train_transform(cuda, torch.Generator().manual_seed(0), **options)  # first use: constants copied once
        with cuda_syncs() as syncs:
            gpu = train_transform(cuda, torch.Generator().manual_seed(0), **options)
        assert syncs == [], options
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-3)
    torch.testing.assert_close(eval_transform(cuda, 224).cpu(), eval_transform(images, 224), rtol=0, atol=1e-5)


def test_a_batchs_parameters_travel_packed_and_come_back_as_they_were(monkeypatch):
    """:func:`send` packs what a batch sends to the GPU into one int64 tensor (one copy) and cuts it back:
    lossless, with each tensor's shape and dtype; on the CPU it passes them through untouched."""
    g = torch.Generator().manual_seed(0)
    boxes = torch.randint(0, 300, (5, 4), generator=g)
    flips = torch.rand(5, generator=g) < 0.5
    offsets = torch.randint(0, 5, (5, 2), generator=g)
    parts = (boxes, flips, offsets)
    packed = pack(*parts)
    assert packed.shape == (5, 7) and packed.dtype == torch.int64
    for out, part in zip(unpack(packed, *parts), parts, strict=True):
        assert out.dtype == part.dtype and torch.equal(out, part)
    empty = (boxes[:0], flips[:0])
    assert [t.shape for t in unpack(pack(*empty), *empty)] == [(0, 4), (0,)]
    cpu = torch.device("cpu")
    assert all(a is b for a, b in zip(send(cpu, boxes, flips), (boxes, flips), strict=True))
    assert to_device(boxes, cpu) is boxes  # nothing pinned or copied for the CPU
    # another device gets one packed copy (the meta device: shapes and dtypes without data, no GPU needed)
    moved = send(torch.device("meta"), *parts)
    assert [(t.device.type, t.shape, t.dtype) for t in moved] == [("meta", t.shape, t.dtype) for t in parts]
    # the transforms fed the packed-and-cut tensors, as on a GPU: the same outputs, bit for bit
    widths, transposed = torch.tensor([32, 40, 64, 50] * 4), torch.tensor([False, True, True, False] * 4)
    images = _padded(32, widths.tolist(), 64)
    geometry = {"widths": widths, "transposed": transposed}
    calls = [
        lambda: train_transform(images, torch.Generator().manual_seed(1), pad=3),
        lambda: train_transform(images, torch.Generator().manual_seed(1), crop=16),
        lambda: train_transform(images, torch.Generator().manual_seed(1), crop=16, **geometry),
        lambda: eval_transform(images, 24, **geometry),
        lambda: eval_transform(images, 24, widths),
    ]
    expected = [call() for call in calls]
    monkeypatch.setattr(transforms, "send", lambda device, *parts: unpack(pack(*parts), *parts))
    for call, out in zip(calls, expected, strict=True):
        assert torch.equal(call(), out)


# The image cache's geometry: image i is its valid region H × widths[i] (columns [0, w_i), padding after), stored
# transposed where ``transposed[i]`` (a portrait image, its longer side along the columns).

SENTINEL = 255  # the padding in these tests; the valid pixels stay below it


def _padded(h: int, widths: list[int], w: int, seed: int = 0) -> torch.Tensor:
    """uint8 (B, 3, h, w): random pixels in [0, 200] in columns [0, w_i), SENTINEL after."""
    images = torch.randint(
        0, 201, (len(widths), 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    for image, width in zip(images, widths, strict=True):
        image[..., width:] = SENTINEL
    return images


def _pixels(normalised: torch.Tensor) -> torch.Tensor:
    """normalize's inverse: back to the 0–255 scale."""
    return (normalised * STD + MEAN) * 255


@pytest.mark.parametrize("scale", [SCALE, (0.9, 1.0), (2.0, 3.0)])  # the last: every box is the central fallback
def test_training_crops_never_read_padding(scale):
    widths = [32, 40, 64, 50, 33, 64, 45, 32] * 25
    transposed = torch.tensor([False, True, False, True, True, False, False, True] * 25)
    images = _padded(32, widths, 64)
    geometry = {"widths": torch.tensor(widths), "transposed": transposed}
    out = train_transform(images, torch.Generator().manual_seed(0), crop=16, scale=scale, **geometry)
    assert out.shape == (200, 3, 16, 16)
    assert _pixels(out).max() < 200.5  # bilinear mixes of valid pixels only: the sentinel never leaks in


@pytest.mark.parametrize(("height", "width"), [(32, 64), (64, 32), (40, 41)])
def test_per_image_sizes_give_the_same_boxes_as_one_size(height, width):
    one = sample_crop_boxes(500, height, width, torch.Generator().manual_seed(0), SCALE, RATIO)
    heights, widths = torch.full((500,), height), torch.full((500,), width)
    assert torch.equal(one, sample_crop_boxes(500, heights, widths, torch.Generator().manual_seed(0), SCALE, RATIO))


def test_per_image_boxes_fit_their_own_image_and_fall_back_like_torchvision():
    heights, widths = torch.tensor([256, 100, 300, 120] * 500), torch.tensor([256, 300, 100, 150] * 500)
    boxes = sample_crop_boxes(2000, heights, widths, torch.Generator().manual_seed(0), SCALE, RATIO)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= heights).all() and (left + w <= widths).all()
    impossible = (2.0, 3.0)
    boxes = sample_crop_boxes(4, heights[:4], widths[:4], torch.Generator().manual_seed(0), impossible, RATIO)
    expected = [
        list(RandomResizedCrop.get_params(torch.empty(3, hh, ww), list(impossible), list(RATIO)))
        for hh, ww in zip(heights[:4].tolist(), widths[:4].tolist(), strict=True)
    ]
    assert boxes.tolist() == expected


def test_a_transposed_images_crop_is_the_crop_of_the_untransposed_image():
    original = _images(2, 48, 32).float()  # portrait
    stored = original.transpose(-1, -2)  # 32 × 48, as the cache keeps it
    box = torch.tensor([[5, 3, 30, 20], [0, 0, 48, 32]])  # (top, left, height, width) on the original
    flips = torch.tensor([True, False])
    expected = crop_and_resize(original, box, 16, flips)
    out = crop_and_resize(stored, box[:, [1, 0, 3, 2]], 16, flips, transposed=torch.tensor([True, True]))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-3)
    # the whole transform: boxes drawn on the original image, the same draws, so the same crops
    portrait = _images(64, 48, 32)
    cached = torch.cat([portrait.transpose(-1, -2), torch.zeros(64, 3, 32, 8, dtype=torch.uint8)], dim=-1)  # padded
    geometry = {"widths": torch.full((64,), 48), "transposed": torch.ones(64, dtype=torch.bool)}
    ours = train_transform(cached, torch.Generator().manual_seed(5), crop=16, **geometry)
    theirs = train_transform(portrait, torch.Generator().manual_seed(5), crop=16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_eval_crop_is_centred_in_each_valid_region_and_transposed_back():
    widths, transposed = [32, 40, 64, 41], torch.tensor([False, True, False, True])
    images = _padded(32, widths, 64)
    out = eval_transform(images, 24, torch.tensor(widths), transposed)
    assert out.shape == (4, 3, 24, 24) and _pixels(out).max() < 200.5
    for o, image, width, t in zip(out, images, widths, transposed, strict=True):
        expected = TF.center_crop(image[..., :width], [24, 24])
        expected = expected.transpose(-1, -2) if t else expected
        torch.testing.assert_close(o, normalize(expected[None])[0], rtol=0, atol=0)
    # the geometry of a full, untransposed batch changes nothing
    full = eval_transform(images, 24, torch.full((4,), 64), torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(full, eval_transform(images, 24), rtol=0, atol=0)


def test_geometry_errors():
    images = _images(2, 32, 64)
    with pytest.raises(ValueError, match="valid widths must be between 1 and the images' width 64"):
        eval_transform(images, 16, torch.tensor([32, 65]))
    with pytest.raises(ValueError, match="crop 33 must be between 1 and the image size 32×32"):
        eval_transform(images, 33, torch.tensor([32, 64]))
    with pytest.raises(ValueError, match="valid widths"):
        train_transform(images, torch.Generator(), crop=16, widths=torch.tensor([0, 64]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_geometry_on_the_gpu_matches_the_cpu():
    """The image cache's path (boxes, flips and orientation sent in one copy), without waiting for the device."""
    widths, transposed = torch.tensor([256, 300, 384, 512] * 4), torch.tensor([False, True, True, False] * 4)
    images = _padded(256, widths.tolist(), 512)
    cuda = images.cuda()
    geometry = {"widths": widths, "transposed": transposed}
    cpu = train_transform(images, torch.Generator().manual_seed(0), crop=224, **geometry)
    eval_transform(cuda, 224, **geometry)  # first use: constants copied once
    with cuda_syncs() as syncs:
        gpu = train_transform(cuda, torch.Generator().manual_seed(0), crop=224, **geometry)
        evaluated = eval_transform(cuda, 224, **geometry)
    assert syncs == []
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-3)
    torch.testing.assert_close(evaluated.cpu(), eval_transform(images, 224, **geometry))
