"""Dataset checks that make bad data fail clearly: class-disjoint splits, image modes that PIL's plain
RGB conversion gets wrong, unexpected image_folder layouts, single-image classes, a safe CUB download."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from study.data import cub200, index_dataset, index_warnings
from study.data.image_folder import EXPECTED as FOLDER_LAYOUTS
from study.data.images import DatasetLayoutError, ImageIndex, _decode, _image_size, _to_rgb, load_images
from study.data.loaders import INDEXES
from study.data.splits import shared_classes, single_image_classes
from tests.test_data_datasets import GREEN, build_cub200, serve, write_image

WHITE = (255, 255, 255)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- manifest: labels as text, class-disjoint splits ---------------------------------------------------------


def write_manifest(folder: Path, rows: list[dict], name: str = "m.csv") -> Path:
    for row in rows:
        if not (folder / row["path"]).exists():
            write_image(folder / row["path"], GREEN)
    table = pd.DataFrame(rows)
    path = folder / name
    table.to_csv(path, index=False) if name.endswith(".csv") else table.to_parquet(path)
    return path


def test_manifest_labels_are_text_in_integer_then_text_order(tmp_path):
    names = ["b", "10", "1.0", "NA", "2", "01", "1"]  # 1, 01 and 1.0 are three classes; NA is a class, not missing
    path = tmp_path / "m.csv"
    for i in range(len(names)):
        write_image(tmp_path / f"{i}.png", GREEN)
    # written as text: the exact strings a user's file holds
    path.write_text("path,label\n" + "".join(f"{i}.png,{name}\n" for i, name in enumerate(names)))
    index = INDEXES["manifest"](path)
    order = ["01", "1", "2", "10", "1.0", "NA", "b"]  # integers by value (ties by text), then the rest as text
    assert index.labels.tolist() == [order.index(name) for name in names]
    # no split column: the first half of the sorted classes (3 of 7) is train
    assert index.split.tolist() == ["train" if order.index(name) < 3 else "test" for name in names]


def test_manifest_parquet_labels_are_text_too(tmp_path):
    rows = [{"path": f"{i}.png", "label": label} for i, label in enumerate([10, 2, 2, 10, 1, 1])]
    index = INDEXES["manifest"](write_manifest(tmp_path, rows, "m.parquet"))
    assert index.labels.tolist() == [2, 1, 1, 2, 0, 0]  # "2" before "10": by value, not "10" < "2"
    floats = [{"path": f"{i}.png", "label": label} for i, label in enumerate([1.0, 2.0, 1.0, 2.0])]
    assert INDEXES["manifest"](write_manifest(tmp_path, floats, "f.parquet")).labels.tolist() == [0, 1, 0, 1]


def test_manifest_splits_must_be_class_disjoint(tmp_path):
    rows = [
        {"path": "a.png", "label": "17", "split": "train"},
        {"path": "b.png", "label": "17", "split": "test"},
        {"path": "c.png", "label": "x", "split": "test"},
        {"path": "d.png", "label": "x", "split": "train"},
        {"path": "e.png", "label": "3", "split": "train"},
        {"path": "f.png", "label": "4", "split": "test"},
        {"path": "g.png", "label": "017", "split": "test"},  # not class 17: text
    ]
    path = write_manifest(tmp_path, rows)
    with pytest.raises(DatasetLayoutError) as error:
        INDEXES["manifest"](path)
    assert one_line(error) == (
        f"manifest: {path}: 2 classes have images in both train and test (first: '17'); "
        "the splits must be class-disjoint"
    )
    with pytest.raises(DatasetLayoutError, match=r"^manifest: .*first: '17'"):  # its message, not the generic one
        index_dataset("manifest", path)
    write_manifest(tmp_path, [row for row in rows if row["path"] not in ("b.png", "c.png")])
    index = index_dataset("manifest", path)
    assert not len(shared_classes(index.labels, index.split)) and len(index.paths) == 5


# --- the generic class-overlap guard, single-image classes -----------------------------------------------------


def fake_index(labels: list[int], split: list[str]) -> ImageIndex:
    return ImageIndex(
        paths=[Path(f"/x/{i}.png") for i in range(len(labels))], labels=np.array(labels), split=np.array(split)
    )


def test_index_dataset_rejects_classes_in_both_splits(monkeypatch, tmp_path):
    mixed = fake_index([1, 1, 3, 3, 5, 5, 7], ["train", "test", "train", "test", "train", "train", "test"])
    monkeypatch.setitem(INDEXES, "cub200", lambda root, **options: mixed)
    with pytest.raises(DatasetLayoutError) as error:
        index_dataset("cub200", tmp_path)
    assert one_line(error) == (
        "cub200: 2 classes have images in both train and test (first: class id 1); the splits must be class-disjoint"
    )
    one = fake_index([1, 1, 3, 3], ["train", "train", "train", "test"])
    monkeypatch.setitem(INDEXES, "cub200", lambda root, **options: one)
    with pytest.raises(
        DatasetLayoutError, match=r"^cub200: 1 class has images in both train and test \(first: class id 3\)"
    ):
        index_dataset("cub200", tmp_path)
    clean = fake_index([1, 1, 3, 3], ["train", "train", "test", "test"])
    monkeypatch.setitem(INDEXES, "cub200", lambda root, **options: clean)
    assert index_dataset("cub200", tmp_path) is clean


def test_single_image_classes():
    labels = np.array([1, 1, 2, 3, 3, 4, 5, 6, 6])
    split = np.array(["train"] * 5 + ["test"] * 4)
    assert single_image_classes(labels, split) == {"train": 1, "test": 2}  # classes 2; 4 and 5
    assert single_image_classes(labels[[0, 1, 3, 4]], split[[0, 1, 3, 4]]) == {}
    assert single_image_classes(np.array([1, 1, 2]), np.array(["train", "train", "test"])) == {"test": 1}


def test_index_warnings():
    index = fake_index([1, 1, 2, 3, 4, 5, 6, 7, 7], ["train"] * 3 + ["test"] * 6)
    assert index_warnings(index, "cub200") == [
        "cub200: 1 train class has a single image; it gives no positive pair in training "
        "and cannot be a validation query",
        "cub200: 4 test classes have a single image; they cannot be queries (no other image of their class)",
    ]
    assert index_warnings(fake_index([1, 1, 2, 2], ["train", "train", "test", "test"])) == []
    assert index_warnings(fake_index([1, 1, 2], ["train", "train", "test"])) == [
        "dataset: 1 test class has a single image; it cannot be a query (no other image of its class)"
    ]


# --- decoding: what PIL's convert("RGB") gets wrong ------------------------------------------------------------


def decoded(path: Path, size: int = 8) -> np.ndarray:
    """The decoded image as (H, W, 3), at its own size (``size`` = its shorter side: no resize)."""
    pixels, transposed = _decode(path, size, max_width=1000)
    return pixels.transpose((2, 1, 0) if transposed else (1, 2, 0))


def test_16_bit_png_keeps_its_top_8_bits(tmp_path):
    values = np.random.default_rng(0).integers(0, 65536, (8, 12), dtype=np.uint16)
    values[0, :3] = [0, 255, 65535]  # black; what a clip would keep; white
    Image.fromarray(values).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as image:
        assert image.mode == "I;16"  # really a 16-bit file
    expected = (values >> 8).astype(np.uint8)
    assert np.array_equal(decoded(tmp_path / "g.png"), np.repeat(expected[..., None], 3, axis=2))
    assert decoded(tmp_path / "g.png")[0, :3, 0].tolist() == [0, 0, 255]  # not clipped to white


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_other_16_bit_modes(mode):
    values = np.random.default_rng(1).integers(0, 65536, (5, 7))
    array = values.astype(">u2") if mode == "I;16B" else values.astype(np.int32)
    image = Image.fromarray(array)
    assert image.mode == mode
    assert np.array_equal(np.asarray(_to_rgb(image))[..., 1], (values >> 8).astype(np.uint8))


PALETTE = [(200, 30, 60), (10, 220, 40), (0, 0, 0), (40, 50, 230)]


def palette_image(indices: np.ndarray) -> Image.Image:
    image = Image.new("P", indices.shape[::-1])
    image.putpalette([channel for colour in PALETTE for channel in colour])
    image.putdata(indices.ravel().tolist())
    return image


@pytest.mark.parametrize("transparent", [None, 2])
def test_palette_png(transparent, tmp_path):
    indices = np.random.default_rng(2).integers(0, 4, (8, 10))
    palette_image(indices).save(tmp_path / "p.png", **({} if transparent is None else {"transparency": transparent}))
    colours = [WHITE if i == transparent else colour for i, colour in enumerate(PALETTE)]
    assert np.array_equal(decoded(tmp_path / "p.png"), np.array(colours, dtype=np.uint8)[indices])


def test_alpha_is_laid_on_white(tmp_path):
    rgba = np.zeros((8, 10, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 30, 60)  # every pixel has a colour; the alpha decides how much of it shows
    rgba[:, :4, 3] = 255
    rgba[:, 4:7, 3] = 0  # transparent: white, not (200, 30, 60)
    rgba[:, 7:, 3] = 128
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    out = decoded(tmp_path / "rgba.png").astype(int)
    assert (out[:, :4] == (200, 30, 60)).all() and (out[:, 4:7] == WHITE).all()
    half = np.array([200, 30, 60]) * 128 / 255 + 255 * 127 / 255
    assert (np.abs(out[:, 7:] - half) <= 1).all()
    la = np.stack([np.full((8, 10), 40, np.uint8), rgba[..., 3]], axis=-1)
    Image.fromarray(la).save(tmp_path / "la.png")
    with Image.open(tmp_path / "la.png") as image:
        assert image.mode == "LA"
    out = decoded(tmp_path / "la.png").astype(int)
    assert (out[:, :4] == 40).all() and (out[:, 4:7] == 255).all()
    assert (np.abs(out[:, 7:] - (40 * 128 / 255 + 255 * 127 / 255)) <= 1).all()


def test_cmyk_jpeg(tmp_path):
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    colours = [(200, 30, 60), (10, 220, 40), (40, 50, 230), (240, 240, 20)]
    for k, colour in enumerate(colours):  # four 8×8 blocks, aligned with JPEG's blocks
        rgb[8 * (k // 2) : 8 * (k // 2) + 8, 8 * (k % 2) : 8 * (k % 2) + 8] = colour
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    with Image.open(tmp_path / "c.jpg") as image:
        assert image.mode == "CMYK"
    out = decoded(tmp_path / "c.jpg", size=16).astype(int)
    for k, colour in enumerate(colours):  # block centres: JPEG's chroma blur stays at the edges
        block = out[8 * (k // 2) + 2 : 8 * (k // 2) + 6, 8 * (k % 2) + 2 : 8 * (k % 2) + 6]
        assert (np.abs(block - np.array(colour)) <= 8).all(), colour


@pytest.mark.parametrize(("orientation", "turn"), [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation(orientation, turn, tmp_path):
    """A camera's landscape JPEG tagged "rotate on display": decoded upright, as the rotated image."""
    pixels = np.random.default_rng(3).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "camera.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "camera.jpg") as image:  # the stored pixels, turned by hand (PNG: lossless)
        assert image.size == (24, 16)
        image.transpose(turn).save(tmp_path / "upright.png")
    assert _image_size(tmp_path / "camera.jpg") == _image_size(tmp_path / "upright.png") == (16, 24)
    camera, upright = _decode(tmp_path / "camera.jpg", 16, 1000), _decode(tmp_path / "upright.png", 16, 1000)
    assert camera[1] and upright[1]  # portrait once upright: stored transposed
    assert np.array_equal(camera[0], upright[0])
    index = ImageIndex(paths=[tmp_path / "camera.jpg"], labels=np.array([0]), split=np.array(["train"]))
    cache = load_images(index, size=8, cache_dir=tmp_path / "cache")
    assert cache.transposed.tolist() == [True] and cache.widths.tolist() == [12]


# --- image_folder: unexpected top-level folders ----------------------------------------------------------------


def folder_tree(root: Path, folders: dict[str, list[str]]) -> Path:
    """``root/<folder>/<class>/0.png`` for each class of each folder ("" for root/<class>/0.png)."""
    for folder, classes in folders.items():
        for name in classes:
            write_image(root / folder / name / "0.png", GREEN)
            write_image(root / folder / name / "1.png", GREEN)
    return root


@pytest.mark.parametrize(
    ("folders", "problem"),
    [
        (
            {"train": ["a", "b"], "test": ["c", "d"], "val": ["e"]},
            "has folder 'val' next to 'train' and 'test' (the split layout has only train/ and test/; "
            "a class folder cannot be named train or test)",
        ),
        ({"": ["ant", "bee", "test"]}, "has folder 'ant' next to 'test'"),
        ({"train": ["a", "b"]}, "has a 'train' folder but no 'test' folder"),
        ({"test": ["a", "b"]}, "has a 'test' folder but no 'train' folder"),
    ],
)
def test_image_folder_rejects_unexpected_top_folders(folders, problem, tmp_path):
    root = folder_tree(tmp_path / "root", folders)
    with pytest.raises(DatasetLayoutError) as error:
        INDEXES["image_folder"](root)
    assert one_line(error).startswith(f"image_folder: {root} {problem}")
    assert one_line(error).endswith(f"; expected {FOLDER_LAYOUTS}")


@pytest.mark.parametrize("split_layout", [True, False])
def test_image_folder_skips_hidden_folders_and_macosx(split_layout, tmp_path):
    root = tmp_path / "root"
    layout = {"train": ["a", "b"], "test": ["c", "d"]} if split_layout else {"": ["a", "b", "c", "d"]}
    folder_tree(root, layout)
    expected = INDEXES["image_folder"](root)
    first = next(iter(layout))  # "train", or "" (root itself)
    for junk in ("__MACOSX", ".git"):  # at the top, as a class folder and inside a class folder
        folder_tree(root, {junk: ["a", "x"], str(Path(first, "a", junk)): ["y"]})
        write_image(root / first / junk / "z.png", GREEN)
    index = INDEXES["image_folder"](root)
    assert index.paths == expected.paths and index.labels.tolist() == expected.labels.tolist()
    assert len(index.paths) == 8 and not any("__MACOSX" in str(p) or "/.git" in str(p) for p in index.paths)


# --- CUB download: MD5, a safe extraction -----------------------------------------------------------------------


def cub_archive(tmp: Path, extra: dict[str, bytes | str] | None = None) -> Path:
    """A CUB archive of the fixture tree; ``extra``: more members, name → content (bytes) or symlink target."""
    build_cub200(tmp / "upstream")
    archive = tmp / "served" / "CUB_200_2011.tgz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp / "upstream" / "CUB_200_2011", arcname="CUB_200_2011")
        for name, content in (extra or {}).items():
            member = tarfile.TarInfo(name)
            if isinstance(content, bytes):
                member.size = len(content)
                tar.addfile(member, io.BytesIO(content))
            else:
                member.type, member.linkname = tarfile.SYMTYPE, content
                tar.addfile(member)
    return archive


def copy_download(archive: Path):
    """A stand-in for torchvision's download_url that copies ``archive`` (the MD5 check is not its part here)."""

    def download(url: str, root: str, filename: str, md5: str) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)  # as download_url does
        shutil.copy(archive, Path(root) / filename)

    return download


def test_cub200_download_extracts_and_removes_the_archive(tmp_path, monkeypatch):
    archive = cub_archive(tmp_path)
    monkeypatch.setattr(cub200, "download_url", copy_download(archive))
    index = INDEXES["cub200"](tmp_path / "data", download=True)
    assert len(index.paths) == 18 and all(
        path.is_relative_to(tmp_path / "data" / "CUB_200_2011") for path in index.paths
    )
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["CUB_200_2011"]  # the archive is gone


def test_cub200_download_with_a_wrong_md5_leaves_nothing(tmp_path, monkeypatch):
    archive = cub_archive(tmp_path)
    server, url = serve(archive.parent)
    try:  # torchvision's own download and MD5 check, from a loopback server
        monkeypatch.setattr(cub200, "URL", f"{url}/CUB_200_2011.tgz")
        monkeypatch.setattr(cub200, "MD5", "0" * 32)
        with pytest.raises(DatasetLayoutError) as error:
            INDEXES["cub200"](tmp_path / "data", download=True)
    finally:
        server.shutdown()
        server.server_close()
    message = one_line(error)
    assert message.startswith(f"cub200: cannot download {url}/CUB_200_2011.tgz (its MD5 differs); expected an")
    assert f"MD5 {'0' * 32}" in message
    assert list((tmp_path / "data").iterdir()) == []  # no archive, nothing extracted


def test_cub200_download_failure_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(cub200, "URL", "http://127.0.0.1:9/CUB_200_2011.tgz")  # the discard port: refused
    with pytest.raises(DatasetLayoutError) as error:
        INDEXES["cub200"](tmp_path / "data", download=True)
    assert one_line(error).startswith("cub200: cannot download http://127.0.0.1:9/CUB_200_2011.tgz (URLError")
    assert list((tmp_path / "data").iterdir()) == []


@pytest.mark.parametrize(
    "extra",
    [
        {"CUB_200_2011/../../evil.txt": b"outside"},
        {"../evil.txt": b"outside"},
        {"CUB_200_2011/link": "../../evil.txt"},  # a link out of root
    ],
)
def test_cub200_archive_escaping_root_is_refused(extra, tmp_path, monkeypatch):
    archive = cub_archive(tmp_path, extra)
    monkeypatch.setattr(cub200, "download_url", copy_download(archive))
    monkeypatch.setattr(cub200, "MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.raises(DatasetLayoutError) as error:
        INDEXES["cub200"](tmp_path / "data", download=True)
    assert one_line(error).startswith(f"cub200: cannot extract {tmp_path / 'data' / 'CUB_200_2011.tgz'} into ")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "data" / "evil.txt").exists()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["CUB_200_2011.tgz"]  # nothing extracted
