"""Dataset loaders on tiny fixture trees in each official layout, and the decode-once image cache."""

from __future__ import annotations

import functools
import hashlib
import http.server
import inspect
import multiprocessing
import os
import shutil
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from study import train as train_module
from study.config import load_study
from study.data import cub200, images
from study.data.images import DatasetLayoutError, ImageIndex, UnreadableImageError, load_images
from study.data.loaders import INDEXES
from study.data.transforms import eval_transform, normalize
from study.train import Learner, build_model, embed, prepare_data
from tests.conftest import TINY_STUDY, write_study
from tests.test_protocol import cub_tree

RED, GREEN, BLUE = (220, 20, 30), (20, 200, 40), (30, 40, 210)


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 8)) -> None:
    """A solid-colour image; the format follows the suffix (JPEG at high quality, so colours survive)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


@dataclass
class Case:
    """A fixture tree: what to pass to the loader and what it must return."""

    root: Path
    labels: dict[Path, int] = field(default_factory=dict)  # every image → its expected label
    colours: dict[Path, tuple[int, int, int]] = field(default_factory=dict)
    train: set[int] = field(default_factory=set)
    test: set[int] = field(default_factory=set)
    required: list[Path] = field(default_factory=list)  # each one missing → an error naming it

    def add(self, path: Path, label: int, split: str) -> Path:
        """Write a solid image with a colour of its own and record what the loader must say about it."""
        i = len(self.colours) + 1
        self.colours[path] = ((37 * i) % 256, (91 * i + 50) % 256, (151 * i + 100) % 256)
        write_image(path, self.colours[path])
        self.labels[path] = label
        (self.train if split == "train" else self.test).add(label)
        return path


def build_cub200(tmp: Path) -> Case:
    top = tmp / "CUB_200_2011"
    case, rows = Case(root=tmp), []
    for cls in (1, 2, 3, 101, 102, 103):
        for k in range(3):
            relative = f"{cls:03d}.Bird_{cls}/Bird_{cls}_{k}.{'png' if k % 2 else 'jpg'}"
            rows.append((len(rows) + 1, relative, cls))
            case.add(top / "images" / relative, cls, "train" if cls <= 100 else "test")
    (top / "images.txt").write_text("".join(f"{i} {relative}\n" for i, relative, _ in rows))
    (top / "image_class_labels.txt").write_text("".join(f"{i} {cls}\n" for i, _, cls in rows))
    first, last = top / "images" / rows[0][1], top / "images" / rows[-1][1]
    case.required = [top / "images.txt", top / "image_class_labels.txt", top / "images", first, last]
    return case


def build_cars196(tmp: Path) -> Case:
    top = tmp / "stanford_cars"
    case, rows = Case(root=tmp), []
    for cls in (1, 2, 98, 99, 150, 196):
        for _ in range(2):
            relative = f"car_ims/{len(rows) + 1:06d}.jpg"
            rows.append((relative, 1, 2, 30, 40, cls, len(rows) % 2))  # the test flag is ignored
            case.add(top / relative, cls, "train" if cls <= 98 else "test")
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annotations = np.array(rows, dtype=[(name, object) for name in fields])
    class_names = np.array([f"Make Model {c}" for c in range(1, 197)], dtype=object)
    scipy.io.savemat(top / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})
    case.required = [top / "cars_annos.mat", top / "car_ims", top / rows[0][0], top / rows[-1][0]]
    return case


def build_sop(tmp: Path) -> Case:
    top = tmp / "Stanford_Online_Products"
    case, image_id = Case(root=tmp), 0
    for name, classes in (("train", (1, 2, 3)), ("test", (4, 5, 6))):
        lines = ["image_id class_id super_class_id path"]
        for cls in classes:
            category, super_class = ("bicycle", 1) if cls % 2 else ("chair", 2)
            for k in range(2):
                image_id += 1
                relative = f"{category}_final/{110000 + cls}_{k}.JPG"
                lines.append(f"{image_id} {cls} {super_class} {relative}")
                case.add(top / relative, cls, name)
        (top / f"Ebay_{name}.txt").write_text("\n".join(lines) + "\n")
    case.required = [top / "Ebay_train.txt", top / "Ebay_test.txt", top / "bicycle_final" / "110001_0.JPG"]
    case.required.append(top / "chair_final" / "110006_1.JPG")  # the last image of Ebay_test.txt
    return case


INSHOP_ITEMS = {  # item number → evaluation status of each of its images
    1: ["train", "train"],
    2: ["query", "gallery", "gallery"],
    3: ["train", "train"],
    4: ["query", "gallery"],
    7: ["query", "query", "gallery"],
}


def build_inshop(tmp: Path, official: bool = False) -> Case:
    top = tmp / "In-shop Clothes Retrieval Benchmark" if official else tmp / "inshop"
    listing, image_root = (top / "Eval", top / "Img") if official else (top, top)
    case, rows = Case(root=tmp if official else top), []
    for item, statuses in INSHOP_ITEMS.items():
        for k, status in enumerate(statuses):
            relative = f"img/{'WOMEN/Dresses' if item % 2 else 'MEN/Denim'}/id_{item:08d}/{k + 1:02d}_1_front.jpg"
            rows.append(f"{relative:<60}id_{item:08d}{' ' * 9}{status}   ")  # runs of spaces, like the real file
            case.add(image_root / relative, item, "train" if status == "train" else "test")
    listing.mkdir(parents=True, exist_ok=True)
    header = "image_name item_id evaluation_status"
    (listing / "list_eval_partition.txt").write_text("\n".join([str(len(rows)), header, *rows]) + "\n")
    first, last = (image_root / row.split()[0] for row in (rows[0], rows[-1]))
    case.required = [listing / "list_eval_partition.txt", image_root / "img", first, last]
    return case


def build_manifest(tmp: Path) -> Case:
    folder = tmp / "data"
    case, rows = Case(root=folder / "manifest.csv"), []
    for label, name in enumerate(["ant", "bee", "cat", "dog"]):  # listed out of order below: sorted labels
        for k in range(2):
            path = case.add(folder / "pics" / f"{name}_{k}.png", label, "train" if label < 2 else "test")
            rows.append({"path": str(path) if name == "dog" else f"pics/{name}_{k}.png", "label": name})
    pd.DataFrame(rows[2:] + rows[:2]).to_csv(case.root, index=False)
    case.required = [case.root, folder / "pics" / "bee_0.png", folder / "pics" / "ant_1.png"]  # first, last rows
    return case


def build_image_folder(tmp: Path) -> Case:
    root = tmp / "folders"
    case = Case(root=root)
    for label, name in enumerate(["ant", "bee", "cat", "dog"]):
        split = "train" if label < 2 else "test"
        for suffix in (".JPG", ".png", ".jpeg", ".bmp", ".webp"):
            case.add(root / name / f"{name}{suffix}", label, split)
        case.add(root / name / "nested" / "deeper.png", label, split)
        (root / name / "notes.txt").write_text("not an image")
        write_image(root / name / ".hidden.png", RED)
        write_image(root / name / ".cache" / "thumb.png", RED)
    case.required = [root]
    return case


FIXTURES: dict[str, Callable[[Path], Case]] = {
    "cub200": build_cub200,
    "cars196": build_cars196,
    "sop": build_sop,
    "inshop": build_inshop,
    "manifest": build_manifest,
    "image_folder": build_image_folder,
}


def check_index(index: ImageIndex, case: Case) -> None:
    """Counts, the label of every image, a class-disjoint split with the right classes on each side."""
    assert len(index.paths) == len(index.labels) == len(index.split) == len(case.labels)
    assert index.labels.dtype == np.int64 and all(path.is_absolute() for path in index.paths)
    assert dict(zip(index.paths, index.labels.tolist(), strict=True)) == case.labels
    assert set(index.labels[index.split == "train"].tolist()) == case.train
    assert set(index.labels[index.split == "test"].tolist()) == case.test
    assert set(index.split.tolist()) == {"train", "test"} and not case.train & case.test


def test_every_loader_has_a_fixture():
    assert set(FIXTURES) == set(INDEXES)


@pytest.mark.parametrize("name", sorted(INDEXES))
def test_signature(name):
    parameters = inspect.signature(INDEXES[name]).parameters
    assert list(parameters)[0] == "root"
    assert set(list(parameters)[1:]) == (set() if name in ("manifest", "image_folder") else {"download"})


@pytest.mark.parametrize("name", sorted(INDEXES))
def test_index_and_pixels(name, tmp_path):
    case = FIXTURES[name](tmp_path)
    index = INDEXES[name](case.root)
    check_index(index, case)
    cache = load_images(index, size=8, cache_dir=tmp_path / "cache")
    pixels = cache.pixels  # the fixtures are 12×8 (w×h): kept whole at 8 px high
    assert pixels.shape == (len(case.labels), 3, 8, 12) and pixels.dtype == np.uint8
    assert (cache.widths == 12).all() and not cache.transposed.any()
    for i, path in enumerate(index.paths):  # a solid colour survives decode, resize and crop (JPEG: nearly)
        assert np.abs(pixels[i].astype(int) - np.array(case.colours[path])[:, None, None]).max() <= 4, path


@pytest.mark.parametrize("name", sorted(INDEXES))
def test_missing_files_are_named(name, tmp_path):
    for i in range(len(FIXTURES[name](tmp_path / "probe").required)):
        case = FIXTURES[name](tmp_path / str(i))
        missing = case.required[i]
        shutil.rmtree(missing) if missing.is_dir() else missing.unlink()
        with pytest.raises(DatasetLayoutError) as error:
            INDEXES[name](case.root)
        assert str(missing) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("name", "top"), [("cub200", "CUB_200_2011"), ("cars196", "stanford_cars"), ("sop", "Stanford_Online_Products")]
)
def test_root_is_the_top_folder_or_its_parent(name, top, tmp_path):
    FIXTURES[name](tmp_path)
    assert INDEXES[name](tmp_path / top).paths == INDEXES[name](tmp_path).paths
    with pytest.raises(DatasetLayoutError, match=f"{name}: {tmp_path / 'elsewhere'}/.* not found; expected"):
        INDEXES[name](tmp_path / "elsewhere")


def test_cub200_expected_layout_message(tmp_path):
    with pytest.raises(DatasetLayoutError) as error:
        INDEXES["cub200"](tmp_path)
    assert str(error.value) == (
        f"cub200: {tmp_path / 'images.txt'} not found; expected CUB_200_2011/ with images.txt, "
        "image_class_labels.txt and images/"
    )


@pytest.mark.parametrize("official", [False, True])
def test_inshop_query_gallery(official, tmp_path):
    case = build_inshop(tmp_path, official=official)
    index = INDEXES["inshop"](case.root)
    check_index(index, case)
    query, gallery, test = index.is_query, index.is_gallery, index.split == "test"
    assert query.sum() == 4 and gallery.sum() == 4
    assert not (query & gallery).any() and np.array_equal(query | gallery, test)
    assert set(index.labels[query].tolist()) == set(index.labels[gallery].tolist()) == {2, 4, 7}
    if official:  # the official top folder may be given itself
        assert INDEXES["inshop"](case.root / "In-shop Clothes Retrieval Benchmark").paths == index.paths


def test_inshop_rejects_a_wrong_count_or_status(tmp_path):
    case = build_inshop(tmp_path)
    listing = case.root / "list_eval_partition.txt"
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join(["99", *lines[1:]]))
    with pytest.raises(DatasetLayoutError, match="must start with a line with the image count"):
        INDEXES["inshop"](case.root)
    listing.write_text("\n".join([*lines[:2], lines[2].replace("train", "val"), *lines[3:]]))
    with pytest.raises(DatasetLayoutError, match="evaluation_status one of train, query, gallery"):
        INDEXES["inshop"](case.root)


@pytest.mark.parametrize("name", ["cars196", "sop", "inshop"])
def test_download_without_a_stable_url(name, tmp_path):
    with pytest.raises(DatasetLayoutError, match=f"{name}: the upstream has no stable download URL; get it by hand"):
        INDEXES[name](tmp_path, download=True)


def test_manifest_parquet_with_split_and_query_gallery(tmp_path):
    paths = [tmp_path / "img" / f"{i}.png" for i in range(6)]
    for i, path in enumerate(paths):
        write_image(path, (40 * i, 0, 0))
    table = pd.DataFrame(
        {
            "path": [f"img/{i}.png" for i in range(6)],
            "label": [30, 30, 10, 10, 20, 20],  # test classes sort between the training classes
            "split": ["train", "train", "test", "test", "train", "train"],
            "is_query": [0, 0, 1, 0, 0, 0],
            "is_gallery": [0, 0, 0, 1, 0, 0],
        }
    )
    table.to_parquet(tmp_path / "m.parquet")
    index = INDEXES["manifest"](tmp_path / "m.parquet")
    assert index.paths == paths and index.labels.tolist() == [2, 2, 0, 0, 1, 1]
    assert index.split.tolist() == table["split"].tolist()
    assert index.is_query.tolist() == [False, False, True, False, False, False]
    assert index.is_gallery.tolist() == [False, False, False, True, False, False]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.drop(columns="label"), "column label is missing or has empty values"),
        (
            lambda t: t.assign(split=["train", "val", "test", "test"]),
            "column split has value 'val'; allowed: train, test",
        ),
        (lambda t: t.assign(is_query=[0, 0, 1, 0]), "column is_query without its partner"),
        (lambda t: t.assign(is_query=[1, 0, 0, 0], is_gallery=[0] * 4), "column is_query is true on a train row"),
        (lambda t: t.assign(is_query=[0, 0, 2, 0], is_gallery=[0] * 4), "column is_query must be true/false or 1/0"),
    ],
)
def test_manifest_errors(change, message, tmp_path):
    for i in range(4):
        write_image(tmp_path / f"{i}.png", GREEN)
    table = pd.DataFrame({"path": [f"{i}.png" for i in range(4)], "label": ["a", "a", "b", "b"]})
    change(table).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(DatasetLayoutError, match=f"manifest: {tmp_path / 'm.csv'}: {message}"):
        INDEXES["manifest"](tmp_path / "m.csv")


def test_manifest_needs_csv_or_parquet(tmp_path):
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(DatasetLayoutError, match="is not a .csv or .parquet file"):
        INDEXES["manifest"](tmp_path / "m.json")


def test_image_folder_with_train_and_test_folders(tmp_path):
    for split, classes in (("train", ["zebra", "yak"]), ("test", ["ant", "bee", "cat"])):
        for name in classes:
            for k in range(2):
                write_image(tmp_path / split / name / f"{k}.png", GREEN)
    index = INDEXES["image_folder"](tmp_path)
    assert len(index.paths) == 10
    label = {
        path.relative_to(tmp_path).parts[:2]: int(lab) for path, lab in zip(index.paths, index.labels, strict=True)
    }
    assert label == {
        ("train", "yak"): 0,
        ("train", "zebra"): 1,
        ("test", "ant"): 2,
        ("test", "bee"): 3,
        ("test", "cat"): 4,
    }
    assert index.split.tolist() == ["train"] * 4 + ["test"] * 6
    write_image(tmp_path / "test" / "yak" / "0.png", GREEN)
    with pytest.raises(DatasetLayoutError, match="class 'yak' is in both"):
        INDEXES["image_folder"](tmp_path)


def test_image_folder_needs_two_classes(tmp_path):
    write_image(tmp_path / "only" / "0.png", GREEN)
    with pytest.raises(DatasetLayoutError, match="no class folders with images for the train split"):
        INDEXES["image_folder"](tmp_path)


def serve(folder: Path) -> tuple[http.server.HTTPServer, str]:
    """A loopback HTTP server for ``folder`` (torchvision's downloader cannot read file:// URLs)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    except OSError as error:
        pytest.skip(f"cannot listen on 127.0.0.1 for the download test: {error}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_cub200_download(tmp_path, monkeypatch):
    build_cub200(tmp_path / "upstream")
    archive = tmp_path / "served" / "CUB_200_2011.tgz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "upstream" / "CUB_200_2011", arcname="CUB_200_2011")
    server, url = serve(archive.parent)
    try:
        monkeypatch.setattr(cub200, "URL", f"{url}/CUB_200_2011.tgz")
        monkeypatch.setattr(cub200, "MD5", hashlib.md5(archive.read_bytes()).hexdigest())
        index = INDEXES["cub200"](tmp_path / "data", download=True)
    finally:
        server.shutdown()
        server.server_close()
    assert len(index.paths) == 18 and index.paths[0].is_relative_to(tmp_path / "data" / "CUB_200_2011")
    assert not (tmp_path / "data" / "CUB_200_2011.tgz").exists()  # the archive is removed once extracted
    monkeypatch.setattr(cub200, "URL", "http://127.0.0.1:9/unreachable.tgz")  # present: no second download
    assert INDEXES["cub200"](tmp_path / "data", download=True).paths == index.paths


def index_of(folder: Path, colours: list[tuple[int, int, int]]) -> ImageIndex:
    paths = [folder / f"{i}.png" for i in range(len(colours))]
    for path, colour in zip(paths, colours, strict=True):
        write_image(path, colour)
    return ImageIndex(paths=paths, labels=np.arange(len(paths)), split=np.array(["train"] * len(paths)))


def thirds(size: tuple[int, int]) -> Image.Image:
    """Red, green and blue thirds along the longer side."""
    image = Image.new("RGB", size, GREEN)
    long = max(size)
    for colour, box in ((RED, (0, long // 3)), (BLUE, (2 * long // 3, long))):
        image.paste(colour, (box[0], 0, box[1], size[1]) if size[0] > size[1] else (0, box[0], size[0], box[1]))
    return image


def index_of_files(paths: list[Path]) -> ImageIndex:
    return ImageIndex(paths=paths, labels=np.arange(len(paths)), split=np.array(["train"] * len(paths)))


def noise(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A random RGB PNG of PIL ``size`` (w, h): every pixel tells where it came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("wide", [True, False])
def test_shorter_side_resize_keeps_the_whole_image(wide, tmp_path):
    thirds((60, 30) if wide else (30, 60)).save(tmp_path / "0.png")
    cache = load_images(index_of_files([tmp_path / "0.png"]), size=15, cache_dir=tmp_path / "cache")
    assert cache.pixels.shape == (1, 3, 15, 30) and cache.widths.tolist() == [30]
    assert cache.transposed.tolist() == [not wide]  # portrait: stored transposed, the longer side along the columns
    x = cache.pixels[0].astype(int)
    assert (x == x[:, :1, :]).all()  # every row alike: the short side is whole
    # 60×30 → 30×15, the whole of it: red, green and blue thirds of 10 columns each.
    for colour, columns in ((RED, slice(0, 9)), (GREEN, slice(11, 19)), (BLUE, slice(21, 30))):
        assert (np.abs(x[:, :, columns] - np.array(colour)[:, None, None]) <= 2).all()


def test_decode_keeps_the_aspect_up_to_max_aspect(tmp_path):
    sizes = {"wide": (300, 150), "tall": (150, 300), "long": (320, 64), "square": (90, 90), "taller": (97, 131)}
    paths = [noise(tmp_path / f"{name}.png", size, seed) for seed, (name, size) in enumerate(sizes.items())]
    cache = load_images(index_of_files(paths), size=64, cache_dir=tmp_path / "cache")
    # widths: int(64 · long / short) like torchvision's Resize(64), at most 64 · 2.0; W: the widest
    assert cache.pixels.shape == (5, 3, 64, 128) and cache.widths.dtype == np.int32
    assert cache.widths.tolist() == [128, 128, 128, 64, 86]
    assert cache.transposed.tolist() == [False, True, False, False, True]
    lefts = []
    for path, x, width, transposed in zip(paths, cache.pixels, cache.widths, cache.transposed, strict=True):
        with Image.open(path) as image:
            w, h = image.size
            short = min(w, h)
            resized = np.asarray(image.resize((int(64 * w / short), int(64 * h / short)), Image.Resampling.BILINEAR))
        expected = resized.transpose((2, 1, 0) if transposed else (2, 0, 1)).astype(int)
        lefts.append(left := (expected.shape[-1] - width) // 2)
        assert (np.abs(x[:, :, :width].astype(int) - expected[:, :, left : left + width]) <= 1).all(), path.name
        assert (x[:, :, width:] == 0).all()  # zero padding after the valid region
    assert lefts == [0, 0, 96, 0, 0]  # nothing cut off up to max_aspect; of the 5:1 image, its central 128 px
    squares = load_images(index_of_files(paths[3:4]), size=64, cache_dir=tmp_path / "cache")
    assert squares.pixels.shape == (1, 3, 64, 64)  # square images cost what the old square cache did


@pytest.mark.parametrize("crop", [56, 49])
def test_eval_transform_of_the_cache_is_torchvisions_resize_and_center_crop(crop, tmp_path):
    paths = [
        noise(tmp_path / f"{i}.png", size, i) for i, size in enumerate([(300, 150), (150, 300), (97, 131), (64, 64)])
    ]
    cache = load_images(index_of_files(paths), size=64, cache_dir=tmp_path / "cache")
    geometry = {"widths": torch.from_numpy(cache.widths), "transposed": torch.from_numpy(cache.transposed)}
    out = eval_transform(torch.from_numpy(np.array(cache.pixels)), crop, **geometry)
    for path, o in zip(paths, out, strict=True):
        with Image.open(path) as image:
            expected = TF.pil_to_tensor(TF.center_crop(TF.resize(image.convert("RGB"), 64), [crop, crop]))
        torch.testing.assert_close(o, normalize(expected[None])[0], rtol=0, atol=1.5 / 255 / 0.224)  # ≤ 1 level


def test_cache_is_reused_and_keyed(tmp_path, monkeypatch):
    index = index_of(tmp_path / "img", [RED, GREEN, BLUE])
    cache = tmp_path / "cache"
    first = load_images(index, size=6, cache_dir=cache)
    assert isinstance(first.pixels, np.memmap) and not first.pixels.flags.writeable
    assert first.pixels.shape == (3, 3, 6, 9) and first.widths.tolist() == [9] * 3  # 12×8 images
    [file] = cache.glob("*.npy")
    assert [p.name for p in cache.glob("*.geometry.npz")] == [f"{file.stem}.geometry.npz"]
    assert np.array_equal(images.read_geometry(first.pixels)[0], first.widths)
    assert images.read_geometry(np.zeros((3, 3, 6, 9), dtype=np.uint8)) is None  # not a cache
    mtime = file.stat().st_mtime_ns

    def no_decode(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(images, "_decode", no_decode)
    monkeypatch.setattr(images, "_image_size", no_decode)
    again = load_images(index, size=6, cache_dir=cache)
    assert np.array_equal(again.pixels, first.pixels) and np.array_equal(again.transposed, first.transposed)
    assert file.stat().st_mtime_ns == mtime and len(list(cache.glob("*.npy"))) == 1
    monkeypatch.undo()
    assert load_images(index, size=4, cache_dir=cache).pixels.shape == (3, 3, 4, 6)  # another size: another file
    # another max_aspect: another file, though these images (3:2) are the same under both
    assert load_images(index, size=6, cache_dir=cache, max_aspect=1.5).pixels.shape == (3, 3, 6, 9)
    assert load_images(index, size=6, cache_dir=cache, max_aspect=1.2).pixels.shape == (3, 3, 6, 7)  # cut to 7 px
    write_image(index.paths[1], BLUE)
    os.utime(index.paths[1], ns=(mtime + 10**9, mtime + 10**9))  # a changed image: another file
    assert load_images(index, size=6, cache_dir=cache).pixels[1, 2].min() == BLUE[2]
    assert len(list(cache.glob("*.npy"))) == len(list(cache.glob("*.geometry.npz"))) == 5
    latest = Path(load_images(index, size=6, cache_dir=cache).pixels.filename)
    latest.with_name(f"{latest.stem}.geometry.npz").unlink()
    with pytest.raises(FileNotFoundError, match=f"delete {latest} to decode the images again"):
        load_images(index, size=6, cache_dir=cache)


@pytest.mark.parametrize("content", [b"not an image at all", None])
def test_unreadable_image(content, tmp_path):
    index = index_of(tmp_path / "img", [RED, GREEN, BLUE])
    bad = index.paths[1]
    if content is None:  # a truncated PNG: the header is fine, the pixel data stops half-way
        noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(bad)
        content = bad.read_bytes()[: bad.stat().st_size // 2]
    bad.write_bytes(content)
    cache = tmp_path / "cache"
    with pytest.raises(UnreadableImageError) as error:
        load_images(index, size=6, cache_dir=cache, workers=2)
    assert str(error.value).startswith(f"{bad}: cannot read image (") and "\n" not in str(error.value)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # no cache, no temp file


def load_in_child(index: ImageIndex, cache: Path, barrier, results) -> None:
    barrier.wait()
    pixels = load_images(index, size=6, cache_dir=cache, workers=2).pixels
    results.put((pixels.filename, pixels.sum()))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_concurrent_callers_decode_once(tmp_path, monkeypatch):
    index = index_of(tmp_path / "img", [RED, GREEN, BLUE, RED])
    log, decode = tmp_path / "decoded.log", images._decode

    def slow_logged_decode(path, size, max_width):
        with open(log, "a") as file:
            file.write(f"{path}\n")
        time.sleep(0.1)  # long enough for the other process to reach the lock
        return decode(path, size, max_width)

    monkeypatch.setattr(images, "_decode", slow_logged_decode)  # inherited by the forked children
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    children = [
        context.Process(target=load_in_child, args=(index, tmp_path / "cache", barrier, results)) for _ in range(2)
    ]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
    assert all(child.exitcode == 0 for child in children)
    assert outcomes[0] == outcomes[1] and len(list((tmp_path / "cache").glob("*.npy"))) == 1
    assert len(log.read_text().splitlines()) == len(index.paths)  # decoded once, not once per caller


def test_training_and_evaluation_use_the_cache_geometry(tmp_path, monkeypatch):
    cub_tree(tmp_path / "data", classes=8, per_class=4)  # 32×24 (w×h) images
    for i, path in enumerate(sorted((tmp_path / "data").rglob("*.jpg"))[::3]):  # and portrait or very wide ones
        noise(path, [(20, 40), (60, 20)][i % 2], seed=i)
    dataset = {"name": "cub200", "root": str(tmp_path / "data"), "image_size": 20, "cache_dir": str(tmp_path / "c")}
    train = {**TINY_STUDY["train"], "batch_size": 8, "crop_size": 16, "eval_batch_size": 5}
    study = load_study(write_study(tmp_path, dataset={**dataset, "val_fraction": 0.5}, train=train))
    data = prepare_data(study.dataset, study.model, study.train, study.seed)
    assert data.inputs.shape == (32, 3, 20, 40)  # 32×24 → 26 px wide; 20×40 → 40 (transposed); 60×20 → 60, cut to 40
    assert set(data.widths.tolist()) == {26, 40} and 0 < data.transposed.sum() < 32
    assert data.geometry([3, 1])["widths"].tolist() == data.widths[[3, 1]].tolist()

    idx = np.arange(32)[::-1].copy()  # any order, several evaluation batches: each gets its own rows' geometry
    model = build_model(study.model, study.seed).eval()
    with torch.no_grad():
        expected = model(eval_transform(torch.from_numpy(data.inputs[idx]), 16, **data.geometry(idx)))
    torch.testing.assert_close(
        torch.from_numpy(embed(model, data, data.inputs, idx, study.train, torch.device("cpu"))), expected
    )

    calls, transform = [], train_module.train_transform

    def checked_transform(x, generator, **kwargs):  # the batch's geometry is its rows' own: zeros right of w_i
        widths = kwargs["widths"].tolist()
        calls.append(all((row[..., w:] == 0).all() and row[..., w - 1].any() for row, w in zip(x, widths, strict=True)))
        return transform(x, generator, **kwargs)

    monkeypatch.setattr(train_module, "train_transform", checked_transform)
    learner = Learner(study.model, "multi_similarity", {}, study.train, data, data.folds[0][0], 0, torch.device("cpu"))
    assert np.isfinite(learner.train_epoch(1, data.inputs)) and calls and all(calls)

    features = study.train.model_copy(update={"mode": "features"})
    cached = prepare_data(study.dataset, study.model, features, study.seed)  # the same evaluation transform
    trunk = build_model(study.model, study.seed).eval()
    everything = np.arange(32)
    with torch.no_grad():
        expected = trunk.features(
            eval_transform(torch.from_numpy(np.array(data.inputs)), 16, **data.geometry(everything))
        )
    torch.testing.assert_close(torch.from_numpy(np.array(cached.inputs)), expected, rtol=1e-5, atol=1e-5)
