"""Forward + backward time of each loss of ``study.losses`` against pytorch-metric-learning (PML).

For each (loss variant, batch, class count) it times ours and PML's same loss (miner + loss where PML
needs one) in one run on the same data: 2 warm-up iterations, then the median of ``--repeat`` forward +
backward passes (into the embeddings and the loss's parameters, no optimizer step) on fresh leaf
L2-normalised float32 embeddings; labels are 4 samples per class, classes drawn from ``num_classes``.
On CUDA it synchronises around each pass and reports our loss's peak allocated memory. A loss that
raises (out of memory, say) gets ``error: ...`` in its cell and the run goes on.

Run from the repository root: ``.venv/bin/python benchmarks/losses.py [--batch 256 1024] [--classes 100 10000]
[--dim 512] [--losses triplet ...] [--repeat 5] [--device cuda|cpu] [--seed 0] [--out FILE]`` (defaults shown).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

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
    "Note: triplet (semihard) is a same-job comparison, not the same triplets: per positive pair ours takes the "
    "anchor's nearest negative farther than the positive (FaceNet); PML's TripletMarginMiner('semihard') keeps every "
    "negative with D_ap < D_an < D_ap + margin. margin: ours learns β and uses every positive pair; PML's β is fixed "
    "and its DistanceWeightedMiner draws positives at random."
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


def pml_margin(c: int, d: int) -> nn.Module:
    return Mined(miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4), losses.MarginLoss(0.2, beta=1.2))


def pml_multi_similarity(c: int, d: int) -> nn.Module:
    return Mined(miners.MultiSimilarityMiner(epsilon=0.1), losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5))


def pml_semihard(c: int, d: int) -> nn.Module:
    return Mined(miners.TripletMarginMiner(0.2, type_of_triplets="semihard"), losses.TripletMarginLoss(margin=0.2))


Build = Callable[[], nn.Module]
Cell = tuple[str, float | None, float | None]  # (cell text, ms, peak MB)
PmlFactory = Callable[[int, int], nn.Module] | str  # a str is printed in the PML column instead
# (row label, our loss name, our hyperparameters, PML counterpart)
VARIANTS: list[tuple[str, str, dict[str, object], PmlFactory]] = [
    ("contrastive", "contrastive", {}, lambda c, d: losses.ContrastiveLoss(pos_margin=0, neg_margin=1)),
    ("margin", "margin", {}, pml_margin),
    ("multi_similarity", "multi_similarity", {}, pml_multi_similarity),
    ("normalized_softmax", "normalized_softmax", {}, lambda c, d: losses.NormalizedSoftmaxLoss(c, d, temperature=0.05)),
    ("pddm", "pddm", {}, "—"),
    ("proxy_anchor", "proxy_anchor", {}, lambda c, d: losses.ProxyAnchorLoss(c, d, margin=0.1, alpha=32)),
    ("proxy_anchor (so_weight=0.01)", "proxy_anchor", {"so_weight": 0.01}, ""),
    ("proxy_nca", "proxy_nca", {}, lambda c, d: losses.ProxyNCALoss(c, d, softmax_scale=1)),
    ("soft_triple", "soft_triple", {}, pml_soft_triple),
    ("soft_triple (tau=0)", "soft_triple", {"tau": 0.0}, lambda c, d: losses.SoftTripleLoss(c, d, 10, 20, 0.1, 0.01)),
    ("triplet (all)", "triplet", {"negatives": "all"}, lambda c, d: losses.TripletMarginLoss(margin=0.2)),
    ("triplet (semihard)", "triplet", {"negatives": "semihard"}, pml_semihard),
]


def make_labels(batch: int, num_classes: int) -> torch.Tensor:
    """4 samples per class; distinct classes when there are enough, else each class about equally often."""
    groups = batch // SAMPLES_PER_CLASS
    classes = torch.randperm(max(num_classes, groups))[:groups] % num_classes
    return classes.repeat_interleave(SAMPLES_PER_CLASS)


def time_loss(build: Build, data: list[torch.Tensor], labels: torch.Tensor, seed: int) -> tuple[float, float | None]:
    """(median ms of forward + backward after the warm-up, peak MB on CUDA or None)."""
    cuda = labels.device.type == "cuda"
    torch.manual_seed(seed)  # torch's generators (CPU and CUDA) are the only RNG either side draws from
    loss = build().to(labels.device)
    if cuda:
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
    return statistics.median(times[WARMUP:]), torch.cuda.max_memory_allocated() / 2**20 if cuda else None


def run_cell(build: Build, data: list[torch.Tensor], labels: torch.Tensor, seed: int) -> Cell:
    """(time cell text, ms or None, peak MB or None); errors and skips become the cell's text."""
    try:
        ms, peak = time_loss(build, data, labels, seed)
        return f"{ms:.2f}", ms, peak
    except Skipped as e:
        return f"skipped: {e}", None, None
    except Exception as e:  # any failure, out of memory included, is reported in the table
        line = (str(e).strip().splitlines() or [""])[0][:100].replace("|", "\\|")
        return f"error: {type(e).__name__}: {line}", None, None
    finally:
        if labels.device.type == "cuda":
            torch.cuda.empty_cache()


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
            torch.manual_seed(args.seed)
            labels = make_labels(batch, num_classes).to(device)
            n = WARMUP + args.repeat
            data = [F.normalize(torch.randn(len(labels), args.dim), dim=1).to(device) for _ in range(n)]
            for label, name, hparams, pml in VARIANTS:
                if name not in args.losses:
                    continue
                print(f"{label} batch={batch} classes={num_classes}", file=sys.stderr, flush=True)
                build = partial(create_loss, name, num_classes, args.dim, **hparams)
                ours, ours_ms, peak = run_cell(build, data, labels, args.seed)
                theirs, pml_ms = pml, None
                if callable(pml):
                    theirs, pml_ms, _ = run_cell(partial(pml, num_classes, args.dim), data, labels, args.seed)
                ratio = f"{ours_ms / pml_ms:.2f}" if ours_ms and pml_ms else ""
                mb = f"{peak:.0f}" if peak is not None else ""
                rows.append([label, len(labels), num_classes, ours, theirs, ratio, mb])

    headers = ["loss", "batch", "classes", "ours ms", "PML ms", "ratio (ours/PML)", "peak MB (ours)"]
    table = tabulate(rows, headers, "github", disable_numparse=True, colalign=("left",) + ("right",) * 6)
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    header = f"Device: {device.type} ({name}); torch {torch.__version__}; PML {pytorch_metric_learning.__version__}; "
    header += f"dim {args.dim}; median of {args.repeat} after {WARMUP} warm-up"
    text = f"{header}\n\n{table}\n\n{NOTE}\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
