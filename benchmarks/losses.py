"""Forward + backward time of each loss of ``study.losses`` against pytorch-metric-learning (PML).

For every (loss variant, batch size, class count) it times, in the same process and on the same
data, our loss and PML's implementation of the same loss (miner + loss together where PML needs a
miner): 2 warm-up iterations, then the median of ``--repeat`` iterations of one forward and one
backward pass (into the embeddings and the loss's own parameters; no optimizer step) on fresh leaf
embeddings (L2-normalised rows, float32). Labels are an m-per-class batch: 4 samples per class,
classes drawn from ``num_classes``. On CUDA the device is synchronised around each iteration and
the peak allocated memory of our loss is reported. A loss that raises (e.g. out of memory) gets
``error: ...`` in its cell and the run goes on.

Run from the repository root::

    .venv/bin/python benchmarks/losses.py                                   # full grid
    .venv/bin/python benchmarks/losses.py --batch 64 --classes 100 --repeat 2 --out bench.md
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable

import pytorch_metric_learning
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners, regularizers
from tabulate import tabulate
from torch import nn

from study.losses import LOSSES, create_loss

WARMUP = 2
SAMPLES_PER_CLASS = 4
MAX_MASK_BYTES = 2**31  # PML's SparseCentersRegularizer allocates two dense (C·K)² bool masks
NOTE = (
    "Note: triplet (semihard) is a same-job comparison, not the same triplets: ours takes, per positive pair, "
    "the anchor's nearest negative farther than the positive (FaceNet); PML's TripletMarginMiner('semihard') "
    "keeps every negative with D_ap < D_an < D_ap + margin. margin: ours learns β, PML's MarginLoss keeps it fixed."
)


class Skipped(Exception):
    """A PML loss that is not run for this configuration (the message says why)."""


class Mined(nn.Module):
    """A PML miner and loss called as one ``loss(embeddings, labels)``."""

    def __init__(self, miner: nn.Module, loss: nn.Module):
        super().__init__()
        self.miner, self.loss = miner, loss

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings, labels, self.miner(embeddings, labels))


def pml_soft_triple(c: int, d: int) -> nn.Module:
    if 2 * (c * 10) ** 2 > MAX_MASK_BYTES:
        raise Skipped("dense (C·K)² mask")
    reg = regularizers.SparseCentersRegularizer(c, 10)
    return losses.SoftTripleLoss(c, d, 10, la=20, gamma=0.1, margin=0.01, weight_regularizer=reg, weight_reg_weight=0.2)


PmlFactory = Callable[[int, int], nn.Module] | str  # a str is printed in the PML column instead
# (row label, our loss name, our hyperparameters, PML counterpart)
VARIANTS: list[tuple[str, str, dict[str, object], PmlFactory]] = [
    ("contrastive", "contrastive", {}, lambda c, d: losses.ContrastiveLoss(pos_margin=0, neg_margin=1)),
    (
        "margin",
        "margin",
        {},
        lambda c, d: Mined(
            miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4), losses.MarginLoss(margin=0.2, beta=1.2)
        ),
    ),
    (
        "multi_similarity",
        "multi_similarity",
        {},
        lambda c, d: Mined(
            miners.MultiSimilarityMiner(epsilon=0.1), losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
        ),
    ),
    ("normalized_softmax", "normalized_softmax", {}, lambda c, d: losses.NormalizedSoftmaxLoss(c, d, temperature=0.05)),
    ("pddm", "pddm", {}, "—"),
    ("proxy_anchor", "proxy_anchor", {}, lambda c, d: losses.ProxyAnchorLoss(c, d, margin=0.1, alpha=32)),
    ("proxy_anchor (so_weight=0.01)", "proxy_anchor", {"so_weight": 0.01}, ""),
    ("proxy_nca", "proxy_nca", {}, lambda c, d: losses.ProxyNCALoss(c, d, softmax_scale=1)),
    ("soft_triple", "soft_triple", {}, pml_soft_triple),
    ("triplet (all)", "triplet", {"negatives": "all"}, lambda c, d: losses.TripletMarginLoss(margin=0.2)),
    (
        "triplet (semihard)",
        "triplet",
        {"negatives": "semihard"},
        lambda c, d: Mined(
            miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"), losses.TripletMarginLoss(margin=0.2)
        ),
    ),
]


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def make_labels(batch: int, num_classes: int) -> torch.Tensor:
    """4 samples per class; distinct classes when there are enough, else each class about equally often."""
    groups = batch // SAMPLES_PER_CLASS
    classes = torch.randperm(max(num_classes, groups))[:groups] % num_classes
    return classes.repeat_interleave(SAMPLES_PER_CLASS)


def time_loss(
    build: Callable[[], nn.Module], data: list[torch.Tensor], labels: torch.Tensor, seed: int
) -> tuple[float, float | None]:
    """(median ms of forward + backward after the warm-up, peak MB on CUDA or None)."""
    cuda = labels.device.type == "cuda"
    seed_all(seed)
    loss = build().to(labels.device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for x0 in data:
        for p in loss.parameters():
            p.grad = None
        x = x0.clone().requires_grad_()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss(x, labels).backward()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return statistics.median(times[WARMUP:]), peak


def run_cell(build: Callable[[], nn.Module], data: list[torch.Tensor], labels: torch.Tensor, seed: int):
    """(time cell text, ms or None, peak MB or None); errors and skips become the cell's text."""
    try:
        ms, peak = time_loss(build, data, labels, seed)
        return f"{ms:.2f}", ms, peak
    except Skipped as e:
        return f"skipped: {e}", None, None
    except Exception as e:  # noqa: BLE001 - any failure (OOM included) is reported in the table
        line = (str(e).strip().splitlines() or [""])[0][:100].replace("|", "\\|")
        return f"error: {type(e).__name__}: {line}", None, None
    finally:
        if labels.device.type == "cuda":
            torch.cuda.empty_cache()


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return f"Device: {device.type} ({name}); torch {torch.__version__}; pytorch-metric-learning {pytorch_metric_learning.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 10_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--losses", nargs="+", choices=sorted(LOSSES), default=sorted(LOSSES))
    parser.add_argument("--repeat", type=int, default=5, help="timed iterations per cell (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    rows = []
    for batch in args.batch:
        for num_classes in args.classes:
            seed_all(args.seed)
            labels = make_labels(batch, num_classes).to(device)
            data = [
                F.normalize(torch.randn(len(labels), args.dim), dim=1).to(device) for _ in range(WARMUP + args.repeat)
            ]
            for label, name, hparams, pml in VARIANTS:
                if name not in args.losses:
                    continue
                print(f"{label} batch={batch} classes={num_classes}", file=sys.stderr, flush=True)
                ours, ours_ms, peak = run_cell(
                    lambda n=name, h=hparams: create_loss(n, num_classes, args.dim, **h), data, labels, args.seed
                )
                theirs, pml_ms = pml, None
                if callable(pml):
                    theirs, pml_ms, _ = run_cell(lambda f=pml: f(num_classes, args.dim), data, labels, args.seed)
                ratio = f"{ours_ms / pml_ms:.2f}" if ours_ms and pml_ms else ""
                mb = f"{peak:.0f}" if peak is not None else ""
                rows.append([label, len(labels), num_classes, ours, theirs, ratio, mb])

    headers = ["loss", "batch", "classes", "ours ms", "PML ms", "ratio (ours/PML)", "peak MB (ours)"]
    table = tabulate(rows, headers, tablefmt="github", disable_numparse=True)
    text = (
        f"{device_line(device)}; dim {args.dim}; median of {args.repeat} after {WARMUP} warm-up\n\n{table}\n\n{NOTE}\n"
    )
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
