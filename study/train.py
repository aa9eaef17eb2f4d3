"""One trial as a plain function, no Ray and no MLflow: build → fit → evaluate.

``run_trial`` trains one loss with one set of hyperparameters on the training
classes and evaluates on the validation classes after every epoch, handing
each epoch's metrics to ``report`` (Ray Tune's ``tune.report`` when run as a
trial, anything else in tests). Seeded and deterministic on the CPU.

With a ``checkpoint_dir`` the trial saves its whole state after every epoch
(model, loss parameters, optimizer, random generators, the metrics so far) and,
started again on the same folder — after a crash, a retry or a resumed study —
re-reports the epochs it has and continues where it stopped, with the same
results as an uninterrupted run.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from study import metrics
from study.config import DatasetConfig, StudyConfig, TrainConfig
from study.data import create_dataset
from study.data.samplers import MPerClassSampler
from study.data.splits import class_split
from study.data.transforms import eval_transform, train_transform
from study.losses import create_loss
from study.models import EmbeddingNet
from study.storage import Storage

CHECKPOINT = "trial.pt"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the trial is stopped and recorded as failed."""


def save_state(folder: Storage, state: dict) -> None:
    """Write ``state`` atomically: a crash mid-write leaves the previous checkpoint intact."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    folder.child(CHECKPOINT).write_bytes(buffer.getvalue())


def load_state(folder: Storage | None) -> dict | None:
    """The trial's last checkpoint in ``folder``, or None; tensors and plain types only."""
    if folder is None or not folder.child(CHECKPOINT).exists():
        return None
    data = io.BytesIO(folder.child(CHECKPOINT).read_bytes())
    return torch.load(data, map_location="cpu", weights_only=True)


@dataclass(frozen=True)
class PreparedData:
    """A dataset in memory (uint8 images) with its class-disjoint split indices."""

    images: torch.Tensor
    labels: np.ndarray
    splits: dict[str, np.ndarray]

    def subset(self, split: str) -> tuple[torch.Tensor, np.ndarray]:
        idx = np.array(self.splits[split])  # a writable copy: Ray hands out read-only arrays
        return self.images[idx], self.labels[idx]


def prepare_data(cfg: DatasetConfig, seed: int) -> PreparedData:
    images, labels = create_dataset(cfg.name, root=cfg.root, **cfg.options)
    return PreparedData(images, labels, class_split(labels, cfg.val_fraction, seed))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    model.eval()
    out = [
        model(eval_transform(images[i : i + batch_size].to(device))).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).numpy()


def evaluate_model(
    model: nn.Module, data: PreparedData, split: str, train: TrainConfig, device: torch.device, seed: int
) -> dict[str, float]:
    images, labels = data.subset(split)
    return metrics.evaluate(embed(model, images, train.eval_batch_size, device), labels, seed=seed)


def build_model(study: StudyConfig, seed: int) -> EmbeddingNet:
    torch.manual_seed(seed)
    return EmbeddingNet(study.model.backbone, study.model.embedding_dim, study.model.pretrained)


def evaluate_untrained(study: StudyConfig, data: PreparedData, split: str = "val") -> dict[str, float]:
    """The baseline row: the same network, initialised with the study seed, never trained."""
    device = resolve_device(study.train.device)
    model = build_model(study, study.seed).to(device)
    return evaluate_model(model, data, split, study.train, device, study.seed)


def _optimizer(model: nn.Module, loss: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    groups = [{"params": list(model.parameters()), "lr": train.lr}]
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    if loss_params:  # proxies / centers learn in their own group with a larger lr
        groups.append({"params": loss_params, "lr": train.lr * train.loss_lr_mult})
    return torch.optim.AdamW(groups, weight_decay=train.weight_decay)


def run_trial(
    study: StudyConfig,
    loss_name: str,
    loss_params: dict,
    train: TrainConfig | None = None,
    *,
    data: PreparedData | None = None,
    report: Callable[[dict], None] | None = None,
    seed: int | None = None,
    checkpoint_dir: Storage | None = None,
) -> dict[str, float]:
    """Train ``loss_name`` with ``loss_params``; returns the last epoch's validation metrics."""
    train = train or study.train
    seed = study.seed if seed is None else seed
    torch.set_num_threads(max(1, int(study.resources.cpu)))
    device = resolve_device(train.device)
    data = data or prepare_data(study.dataset, study.seed)

    images, raw_labels = data.subset("train")
    classes, labels = np.unique(raw_labels, return_inverse=True)  # 0..C-1 for proxy losses
    labels_t = torch.as_tensor(labels)
    model = build_model(study, seed).to(device)
    loss_fn = create_loss(loss_name, len(classes), study.model.embedding_dim, **loss_params).to(device)
    optimizer = _optimizer(model, loss_fn, train)
    sampler = MPerClassSampler(labels, train.m_per_class, train.batch_size, seed)
    generator = torch.Generator().manual_seed(seed)

    history: list[dict] = []
    state = load_state(checkpoint_dir)
    if state is not None:  # continue a crashed, retried or resumed trial
        model.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history = state["history"]
        for result in history:  # the scheduler and the tracker see every epoch again
            if report is not None:
                report(dict(result))

    result: dict[str, float] = history[-1] if history else {}
    for epoch in range(len(history) + 1, train.epochs + 1):
        start = time.perf_counter()
        sampler.set_epoch(epoch)
        model.train()
        losses = []
        for batch in sampler:
            idx = torch.as_tensor(batch)
            x = train_transform(images[idx], generator).to(device)
            loss = loss_fn(model(x), labels_t[idx].to(device))
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"{loss_name}: training loss is {loss.item()} at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        result = evaluate_model(model, data, "val", train, device, seed)
        result.update(epoch=epoch, train_loss=float(np.mean(losses)), epoch_seconds=time.perf_counter() - start)
        if hasattr(loss_fn, "trial_metrics"):  # e.g. SoftTriple's effective centers per class
            result.update(loss_fn.trial_metrics())
        if not math.isfinite(result["map_at_r"]):
            raise NonFiniteLossError(f"{loss_name}: validation metrics are not finite at epoch {epoch}")
        history.append(result)
        if checkpoint_dir is not None:
            save_state(checkpoint_dir, _state(model, loss_fn, optimizer, generator, history))
        if report is not None:
            report(dict(result))
    return result


def _state(model: nn.Module, loss: nn.Module, optimizer, generator: torch.Generator, history: list[dict]) -> dict:
    return {
        "model": model.state_dict(),
        "loss": loss.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": history,
    }
