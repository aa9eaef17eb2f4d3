"""Training images/s of one step configuration three ways, and evaluation time at SOP size.

1. backbone only: forward + backward + AdamW step of the trial's model and loss on random float tensors
   already on the device (the upper bound);
2. cached: ``Learner.train_epoch`` (the trial code: m-per-class sampler, ``train_transform`` crop + flip on
   the device, loss, step) on uint8 (N, 3, S, S) images, the decode-once cache of the JPEGs of (3), moved to
   the device with ``_on_device``;
3. DataLoader: the same step fed by torch DataLoader workers that decode generated 500×375 JPEGs (CUB's
   typical size) with PIL and apply torchvision.transforms.v2 RandomResizedCrop + flip + normalise per image.

Then feature mode's trunk pass over the same images, timed twice: computed in the first trial, read back
from its cache file in every later one.

Each path runs untimed warm-up steps first (the DataLoader at least workers × prefetch_factor, so the queue
filled during warm-up is spent before timing starts); CUDA is synchronised around every timing. Then
``study.metrics.evaluate`` (all metrics) is timed on random unit embeddings with SOP-like labels, on the GPU
when faiss sees one. Defaults are for a GPU; on a CPU they shrink (resnet18, batch 32, 3 steps).

Run from the repository root: ``PYTHONPATH=. .venv/bin/python benchmarks/throughput.py [--device cuda|cpu]
[--backbone resnet50] [--batch 128] [--steps 50] [--warmup 3] [--workers 8] [--eval-size 60502] ...``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image
from tabulate import tabulate
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from study.config import parse_study
from study.data.images import ImageIndex, load_images
from study.data.samplers import MPerClassSampler
from study.data.transforms import MEAN, STD
from study.metrics import evaluate
from study.train import Learner, PreparedData, _autocast, _on_device, extract_features, resolve_device

SOP = (60_502, 11_316)  # Stanford Online Products test set: images, classes
GPU_DEFAULTS = {"backbone": "resnet50", "batch": 128, "steps": 50, "warmup": 3}
CPU_DEFAULTS = {"backbone": "resnet18", "batch": 32, "steps": 3, "warmup": 1}
STUDY = """
name: throughput
model: {{backbone: {backbone}, embedding_dim: {dim}}}
dataset: {{image_size: {size}}}
train: {{batch_size: {batch}, m_per_class: {m}, crop_size: {crop}, amp: {cuda}, channels_last: {cuda}, device: {dev}}}
search: {{losses: [{loss}]}}
"""


class JpegFolder(Dataset):
    def __init__(self, paths: list[Path], labels: np.ndarray, crop: int):
        self.paths, self.labels = paths, labels
        self.transform = v2.Compose(
            [
                v2.PILToTensor(),
                v2.RandomResizedCrop(crop, scale=(0.16, 1.0), antialias=True),  # train_transform's scale
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(MEAN.flatten().tolist(), STD.flatten().tolist()),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), int(self.labels[i])


def write_jpeg(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    colours = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    smooth = np.asarray(colours.resize((500, 375), Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = np.clip(smooth + rng.integers(-8, 9, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, quality=90)


def images_per_second(learner: Learner, images: int, run) -> float:
    """``images`` / the seconds ``run()`` takes, CUDA synchronised before and after."""
    cuda = learner.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def step(learner: Learner, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One training step as ``Learner.train_epoch`` takes it, on an already transformed batch. Returns the loss,
    still on the device: like the trial, the caller reads its steps' losses once, after the last (:func:`read`)."""
    learner.model.train()
    if learner.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(learner.train, learner.device):
        out = learner.model(x)
    loss = learner.loss_fn(out.float(), labels)
    learner.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    learner.optimizer.step()
    return loss.detach()


def read(losses: list[torch.Tensor]) -> list[float]:
    """The steps' losses on the host: one read of the device for all of them, as the trial reads an epoch's."""
    return torch.stack(losses).tolist() if losses else []


def backbone_only(learner: Learner, args, warmup: int) -> float:
    x = torch.randn(args.batch, 3, args.crop, args.crop, device=learner.device)
    labels = (torch.arange(args.batch) // args.m_per_class).to(learner.device)

    def run(count: int) -> None:
        read([step(learner, x, labels) for _ in range(count)])

    run(warmup)
    return images_per_second(learner, args.steps * args.batch, lambda: run(args.steps))


def cached(learner: Learner, inputs, args, warmup: int) -> float:
    learner.sampler.num_batches = warmup  # an "epoch" of just the warm-up steps, then one of the timed steps
    learner.train_epoch(1, inputs)
    learner.sampler.num_batches = args.steps
    return images_per_second(learner, args.steps * args.batch, lambda: learner.train_epoch(2, inputs))


def dataloader(learner: Learner, dataset: JpegFolder, args, warmup: int) -> float:
    cuda = learner.device.type == "cuda"
    sampler = MPerClassSampler(dataset.labels, args.m_per_class, args.batch, seed=0)  # warmup + steps batches
    batches = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers, pin_memory=cuda))

    def run(count: int) -> None:
        losses = []
        for _ in range(count):
            x, labels = next(batches)
            losses.append(
                step(learner, x.to(learner.device, non_blocking=cuda), labels.to(learner.device, non_blocking=cuda))
            )
        read(losses)

    run(warmup)
    return images_per_second(learner, args.steps * args.batch, lambda: run(args.steps))


def sop_labels(n: int, seed: int) -> np.ndarray:
    """``n`` labels in SOP's proportion of classes, each of 2–12 samples (a fixed-seed assignment)."""
    classes = max(1, round(n * SOP[1] / SOP[0]))
    slots = np.random.default_rng(seed).choice(classes * 10, n - 2 * classes, replace=False)
    return np.repeat(np.arange(classes), 2 + np.bincount(slots // 10, minlength=classes))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--backbone", help="default: resnet50 (GPU), resnet18 (CPU)")
    parser.add_argument("--batch", type=int, help="default: 128 (GPU), 32 (CPU)")
    parser.add_argument("--steps", type=int, help="timed steps per path; default: 50 (GPU), 3 (CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps per path; default: 3 (GPU), 1 (CPU)")
    parser.add_argument("--m-per-class", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=256, help="cached image size S")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--loss", default="multi_similarity")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--eval-size", type=int, default=SOP[0], help="embeddings to evaluate (default: SOP's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    defaults = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    warmups = {"loader": max(args.warmup, args.workers * 2), "other": args.warmup}  # 2: default prefetch_factor
    settings = {"backbone": args.backbone, "dim": args.dim, "size": args.image_size, "batch": args.batch}
    settings |= {"m": args.m_per_class, "crop": args.crop, "cuda": cuda, "dev": device.type, "loss": args.loss}
    study = parse_study(STUDY.format(**settings), "throughput study")

    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "CPU")
    name = torch.cuda.get_device_name(device) if cuda else f"{cpu}, {os.cpu_count()} cores"
    print(f"Device: {device.type} ({name}); torch {torch.__version__}; faiss {faiss.__version__}")
    print(
        f"Settings: {args.backbone}, batch {args.batch} ({args.m_per_class} per class), {args.image_size}-px images → "
        f"{args.crop}-px crops, embedding {args.dim}, {args.loss}, bf16 autocast + channels-last: {cuda}; "
        f"{args.steps} timed steps after {warmups['other']} warm-up ({warmups['loader']} for the DataLoader), "
        f"{args.workers} DataLoader workers"
    )
    if not cuda:
        print("CPU run: small defaults (resnet18, batch 32, 3 steps) unless given; the goals are GPU goals.")

    n = (warmups["loader"] + args.steps) * args.batch
    labels = np.arange(n) // args.m_per_class
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp, f"{i:06d}.jpg") for i in range(n)]
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(write_jpeg, paths, range(n)))
        cache = load_images(ImageIndex(paths, labels, np.full(n, "train")), args.image_size, Path(tmp, "cache"))
        data = PreparedData(
            inputs=cache.pixels,
            labels=labels,
            folds=[],
            trainval=np.arange(n),
            test=np.arange(0),
            widths=cache.widths,
            transposed=cache.transposed,
        )

        def learner() -> Learner:
            return Learner(study.model, args.loss, {}, study.train, data, data.trainval, args.seed, device)

        rates = {"backbone only (random tensors on the device)": backbone_only(learner(), args, warmups["other"])}
        inputs = _on_device(data.inputs, device)
        rates["cached (Learner.train_epoch, images via _on_device)"] = cached(learner(), inputs, args, warmups["other"])
        del inputs
        dataset = JpegFolder(paths, labels, args.crop)
        workers = f"{args.workers} worker{'s' * (args.workers != 1)}"
        rates[f"DataLoader, JPEGs ({workers})"] = dataloader(learner(), dataset, args, warmups["loader"])

        features = study.train.model_copy(update={"mode": "features"})
        feature_seconds = []
        for _ in range(2):  # the first call runs the trunk and keeps its output; the second reads it
            start = time.perf_counter()
            extract_features(study.model, features, data, study.seed)
            feature_seconds.append(time.perf_counter() - start)

    base = next(iter(rates.values()))
    goals = ["", "≥ 90 % (GPU goal)", ""]
    rows = [[path, f"{r:.1f}", f"{100 * r / base:.0f} %", g] for (path, r), g in zip(rates.items(), goals, strict=True)]
    headers = ["path", "images/s", "% of backbone-only", "goal"]
    print("\n" + tabulate(rows, headers, "github", disable_numparse=True, colalign=("left", "right", "right", "left")))

    print(
        f"\nFeature mode, the frozen trunk over {n:,} images: {feature_seconds[0]:.2f} s in the first trial "
        f"(computed, kept next to the image cache), {feature_seconds[1]:.2f} s in every later one (read back)"
    )

    labels = sop_labels(args.eval_size, args.seed)
    x = np.random.default_rng(args.seed).standard_normal((len(labels), args.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    start = time.perf_counter()
    evaluate(x, labels, ks=(1, 10, 100, 1000), seed=args.seed)
    seconds = time.perf_counter() - start
    where = "GPU" if faiss.get_num_gpus() > 0 else f"CPU, {faiss.omp_get_max_threads()} threads"
    print(
        f"\nEvaluation (kNN recall@1/10/100/1000, MAP@R, R-Precision, NMI k-means): {len(labels):,} × {args.dim}, "
        f"{labels.max() + 1:,} classes: {seconds:.1f} s, faiss on {where} (goal: < 3 s on one GPU)"
    )


if __name__ == "__main__":
    main()
