"""One trial as a plain function, no Ray and no MLflow: build → fit → evaluate.

``run_trial`` (the search) trains one loss with one set of hyperparameters on
the training classes of each validation fold — one :class:`Learner` per fold,
side by side — and evaluates on the validation classes after every epoch,
handing each epoch's metrics (mean over folds) to ``report`` (Ray Tune's
``tune.report`` when run as a trial, anything else in tests). ``run_final``
(the final stage) trains once on every training class (or one fold's) and
tests once, after the last epoch, on the test classes. Seeded and
deterministic on the CPU. The caller prepares the data (:func:`load_data`)
and sets the process's threads (:func:`set_threads`).

Data: images stay uint8 until a batch is drawn; on a GPU the whole set is
moved to GPU memory once per trial and augmented there. In feature mode the
frozen trunk's features are computed once (kept next to the image cache) and
only the embedding head and the loss train.

On a GPU a training step never makes the host wait for the device, so that the
host queues the next steps while the device computes: an epoch's batch indices
go to the device in one copy before its first step, a batch's augmentation
parameters in one non-blocking copy (:func:`study.data.transforms.send`), and the
losses stay on the device until the epoch ends (read once: the epoch's mean,
and the check for a non-finite loss). Evaluation likewise keeps the embeddings
on the device and copies them to the host once. What still waits is inside some
losses' mining (a data-dependent number of pairs, e.g. ``nonzero``).

With a ``checkpoint_dir`` the trial saves its whole state after every epoch
(model, loss parameters, optimizer, random generators, the metrics so far) and,
started again on the same folder — after a crash, a retry or a resumed study —
re-reports the epochs it has and continues where it stopped, with the same
results as an uninterrupted run.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

from study import metrics
from study.config import DatasetConfig, ModelConfig, TrainConfig
from study.data import create_dataset, recall_ks
from study.data.images import cached_file
from study.data.samplers import MPerClassSampler, RandomBatchSampler
from study.data.splits import validation_folds
from study.data.transforms import eval_transform, to_device, train_transform
from study.losses import create_loss
from study.models import EmbeddingNet
from study.storage import Storage
from study.vocab import CHECKPOINT_FILE, as_test


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the trial is stopped and recorded as failed.

    Raised at the end of the epoch in which it happened (the losses are read once per epoch, see
    :meth:`Learner.train_epoch`), before that epoch is evaluated or checkpointed; the message names the
    first non-finite value and its step."""


def save_state(folder: Storage, state: dict) -> None:
    """Write ``state`` atomically: a crash mid-write leaves the previous checkpoint intact."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    folder.child(CHECKPOINT_FILE).write_bytes(buffer.getvalue())


def load_state(folder: Storage | None) -> dict | None:
    """The trial's last checkpoint in ``folder``, or None; tensors and plain types only."""
    if folder is None or not folder.child(CHECKPOINT_FILE).exists():
        return None
    data = io.BytesIO(folder.child(CHECKPOINT_FILE).read_bytes())
    return torch.load(data, map_location="cpu", weights_only=True)


@dataclass(frozen=True)
class PreparedData:
    """A dataset ready for trials. ``inputs``: uint8 images (N, 3, S, W) — a tensor, or a read-only
    memory map of the image cache — or, in feature mode, the frozen trunk's float32 features (N, F).
    ``widths`` / ``transposed``: an image cache's geometry (each image's valid width, stored transposed);
    None for synthetic data. ``submodes``: each image's sub-mode where the dataset knows it (synthetic data,
    a manifest's ``submode`` column), else None; indexed like ``labels``, so that every evaluated set —
    a fold's validation classes, the test classes — brings its own for the class-collapse metric."""

    inputs: torch.Tensor | np.ndarray
    labels: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]]  # (training, validation) indices per fold
    trainval: np.ndarray  # every training class: what the final stage trains on without folds
    test: np.ndarray  # test classes (the queries, with a gallery)
    gallery: np.ndarray | None = None  # query/gallery protocols (In-Shop)
    features: bool = False
    ks: tuple[int, ...] = (1, 2, 4, 8)  # Recall@K as the dataset's papers report it
    widths: np.ndarray | None = None
    transposed: np.ndarray | None = None
    submodes: np.ndarray | None = None

    def submodes_of(self, idx: np.ndarray) -> np.ndarray | None:
        """The sub-modes of samples ``idx`` (for :func:`study.metrics.evaluate`), or None when unknown."""
        return None if self.submodes is None else self.submodes[np.asarray(idx)]

    def geometry(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """The transforms' geometry arguments for samples ``idx`` (gathered like their pixels); {} without."""
        if self.widths is None:
            return {}
        idx = np.asarray(idx)
        return {"widths": torch.from_numpy(self.widths[idx]), "transposed": torch.from_numpy(self.transposed[idx])}


def prepare_data(dataset: DatasetConfig, model: ModelConfig, train: TrainConfig, seed: int) -> PreparedData:
    """The dataset, its validation folds (drawn with ``seed``) and test split; in feature mode (``train``: the
    study's recipe), the features of ``model``'s frozen trunk."""
    ds = create_dataset(
        dataset.name,
        dataset.root,
        decode_size=dataset.image_size,
        cache_dir=dataset.cache_dir,
        max_aspect=dataset.max_aspect,
        **dataset.options,
    )
    folds = validation_folds(ds.labels, ds.split, val_fraction=dataset.val_fraction, folds=dataset.folds, seed=seed)
    queries = ds.split == "test" if ds.is_query is None else ds.is_query
    data = PreparedData(
        inputs=ds.images,
        labels=np.asarray(ds.labels),
        folds=folds,
        trainval=np.flatnonzero(ds.split == "train"),
        test=np.flatnonzero(queries),
        gallery=None if ds.is_gallery is None else np.flatnonzero(ds.is_gallery),
        ks=recall_ks(dataset.name),
        widths=ds.widths,
        transposed=ds.transposed,
        submodes=ds.submodes,
    )
    if train.mode == "features":  # features, not images: the image geometry no longer applies
        features = extract_features(model, train, data, seed)
        data = replace(data, inputs=features, features=True, widths=None, transposed=None)
    return data


@functools.lru_cache(maxsize=1)
def _load_data(dataset_json: str, model_json: str, train_json: str, seed: int) -> PreparedData:
    return prepare_data(
        DatasetConfig.model_validate_json(dataset_json),
        ModelConfig.model_validate_json(model_json),
        TrainConfig.model_validate_json(train_json),
        seed,
    )


def load_data(dataset: DatasetConfig, model: ModelConfig, train: TrainConfig, seed: int) -> PreparedData:
    """:func:`prepare_data`, once per process: a worker running trial after trial keeps it."""
    return _load_data(dataset.model_dump_json(), model.model_dump_json(), train.model_dump_json(), seed)


def set_threads(cpus: float) -> None:
    """Torch's intra-op threads for this process: ``cpus`` (a trial's CPU share), at least one."""
    torch.set_num_threads(max(1, int(cpus)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _rows(inputs: torch.Tensor | np.ndarray, idx: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of ``inputs``. A tensor is indexed on its device: pass ``idx`` already there (see
    :func:`_indices`), or it is copied, a transfer that waits for the device. A memory map reads just these rows."""
    if isinstance(inputs, torch.Tensor):
        return inputs[torch.as_tensor(idx, device=inputs.device)]
    return torch.from_numpy(inputs[np.asarray(idx)])


def _indices(idx: np.ndarray, device: torch.device) -> torch.Tensor:
    """Integer indices as an int64 tensor on ``device``, in one non-blocking copy."""
    return to_device(torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64)), device)


def _on_device(inputs: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor | np.ndarray:
    """On a GPU, every input goes to its memory once (the cached mode: no per-step decoding or
    host-to-device copies); on the CPU, a memory map stays one and batches are read from it."""
    if device.type == "cpu":
        return inputs
    out = torch.empty(tuple(inputs.shape), dtype=torch.as_tensor(inputs[:1]).dtype, device=device)
    for start in range(0, len(inputs), 4096):  # in chunks: never a second full copy in host memory
        out[start : start + 4096] = torch.as_tensor(np.asarray(inputs[start : start + 4096])).to(device)
    return out


def _autocast(train: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=train.amp and device.type == "cuda")


@torch.no_grad()
def _encode(encoder: Callable, data: PreparedData, inputs, idx: np.ndarray, train: TrainConfig, device) -> torch.Tensor:
    """``encoder(x, **geometry)`` applied to samples ``idx`` in batches of ``eval_batch_size`` (each batch
    with its images' geometry, see :meth:`PreparedData.geometry`), as float32 on the CPU.

    The batches' indices go to the inputs' device once and the outputs are written into one float32 tensor
    on the encoder's device, copied to the CPU once at the end: no batch waits for the device (a copy per
    batch would). Inputs read on the CPU (a memory map, for the trunk's features) go to the device through
    pinned memory, so that reading the next batch overlaps this one's computation."""
    idx = np.asarray(idx)
    on_device = _indices(idx, inputs.device) if isinstance(inputs, torch.Tensor) else idx
    out: torch.Tensor | None = None
    for start in range(0, len(idx), train.eval_batch_size):
        stop = start + train.eval_batch_size
        x = to_device(_rows(inputs, on_device[start:stop]), device)
        with _autocast(train, device):
            y = encoder(x, **data.geometry(idx[start:stop]))
        if out is None:  # the output's size is known from the first batch
            out = torch.empty((len(idx), *y.shape[1:]), dtype=torch.float32, device=y.device)
        out[start:stop] = y  # cast to float32 as it is written
    if out is None:
        raise ValueError("no samples to encode")
    return out.cpu()


def embed(
    model: EmbeddingNet, data: PreparedData, inputs, idx: np.ndarray, train: TrainConfig, device: torch.device
) -> np.ndarray:
    """L2-normalised embeddings of samples ``idx`` (evaluation transform: center crop of each whole image)."""
    model.eval()
    if data.features:
        return _encode(model.embed_features, data, inputs, idx, train, device).numpy()
    return _encode(lambda x, **g: model(_eval_input(x, train, **g)), data, inputs, idx, train, device).numpy()


def _channels_last(x: torch.Tensor, train: TrainConfig) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if train.channels_last else x


def _eval_input(x: torch.Tensor, train: TrainConfig, **geometry) -> torch.Tensor:
    """The evaluation transform; ``geometry``: the batch's widths / transposed flags (image caches)."""
    return _channels_last(eval_transform(x, crop=train.crop_size, **geometry), train)


def extract_features(
    model: ModelConfig, train: TrainConfig, data: PreparedData, seed: int
) -> torch.Tensor | np.ndarray:
    """The frozen trunk's pooled features of every image (center crop), for feature mode.

    For an image dataset they are computed once and kept next to its image cache, in a file named
    after the images and everything the trunk's output depends on (:func:`_trunk_key`): every trial,
    worker, loss and later study with the same images and trunk memory-maps them. Synthetic data's
    are computed once per process."""
    if not isinstance(data.inputs, np.memmap):
        return _trunk_features(model, train, data, seed)
    images = Path(data.inputs.filename)
    target = images.with_name(f"features_{images.stem}_{_trunk_key(model, train, seed)}.npy")

    def write(temp: Path) -> None:
        with temp.open("wb") as out:
            np.save(out, _trunk_features(model, train, data, seed).numpy())

    return np.load(cached_file(target, write), mmap_mode="r")


def _trunk_features(model: ModelConfig, train: TrainConfig, data: PreparedData, seed: int) -> torch.Tensor:
    device = resolve_device(train.device)
    net = build_model(model, seed, train.channels_last).to(device).eval()
    everything = np.arange(len(data.inputs))
    encoder = lambda x, **g: net.features(_eval_input(x, train, **g))  # noqa: E731
    return _encode(encoder, data, data.inputs, everything, train, device)


def _trunk_key(model: ModelConfig, train: TrainConfig, seed: int) -> str:
    """A hash of what the trunk's features depend on besides the pixels."""
    weights = model.pretrained
    if isinstance(weights, Path):  # a local file: its content may change under the same name
        stat = weights.stat()
        weights = f"{weights.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    key = {
        "backbone": model.backbone,
        "backbone_options": model.backbone_options,
        "weights": weights,
        "seed": None if model.pretrained else seed,  # random init: the seed draws the trunk
        "pooling": model.pooling,
        "crop": train.crop_size,
        "device": resolve_device(train.device).type,
        "bf16": train.amp,
        "timm": timm.__version__,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_split(
    model: EmbeddingNet, data: PreparedData, inputs, split: np.ndarray, train: TrainConfig, device, seed: int
) -> dict[str, float]:
    """Retrieval metrics of samples ``split`` among themselves (validation, or test without a gallery), with
    the class-collapse metric where the data has sub-modes."""
    embeddings = embed(model, data, inputs, split, train, device)
    return metrics.evaluate(embeddings, data.labels[split], ks=data.ks, seed=seed, submodes=data.submodes_of(split))


def evaluate_test(
    model: EmbeddingNet, data: PreparedData, inputs, train: TrainConfig, device, seed: int
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Test metrics (queries against the gallery where the protocol has one) and the embeddings. Without a
    gallery and with sub-modes, also the class-collapse metric; the sub-modes are then saved too
    (``test_submodes``), so that the embeddings alone can be evaluated again the same way."""
    saved = {"test": embed(model, data, inputs, data.test, train, device), "test_labels": data.labels[data.test]}
    saved["ks"] = np.array(data.ks)
    gallery = None
    if data.gallery is not None:
        saved |= {"gallery": embed(model, data, inputs, data.gallery, train, device)}
        saved["gallery_labels"] = data.labels[data.gallery]
        gallery = (saved["gallery"], saved["gallery_labels"])
    elif data.submodes is not None:
        saved["test_submodes"] = data.submodes_of(data.test)
    result = metrics.evaluate(
        saved["test"], saved["test_labels"], ks=data.ks, seed=seed, gallery=gallery, submodes=saved.get("test_submodes")
    )
    return result, saved


def build_model(model: ModelConfig, seed: int, channels_last: bool = False) -> EmbeddingNet:
    """The network ``model`` describes, initialised with ``seed``."""
    torch.manual_seed(seed)
    net = EmbeddingNet(
        model.backbone,
        model.embedding_dim,
        model.pretrained,
        pooling=model.pooling,
        freeze_bn=model.freeze_bn,
        backbone_options=model.backbone_options,
    )
    return net.to(memory_format=torch.channels_last) if channels_last else net


def evaluate_untrained(
    model: ModelConfig, train: TrainConfig, data: PreparedData, seed: int
) -> tuple[dict[str, float], dict[str, float]]:
    """The baseline: the network initialised with ``seed``, never trained. Returns its
    validation metrics (mean over folds) and its test metrics."""
    device = resolve_device(train.device)
    net = build_model(model, seed, train.channels_last).to(device)
    inputs = _on_device(data.inputs, device)
    val = _mean([evaluate_split(net, data, inputs, v, train, device, seed) for _, v in data.folds])
    return val, evaluate_test(net, data, inputs, train, device, seed)[0]


def _mean(results: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in results])) for k in results[0]}


class Learner:
    """One network learning one loss on the training classes ``fit`` (indices into the data)."""

    def __init__(
        self,
        model: ModelConfig,
        loss_name: str,
        loss_params: dict,
        train: TrainConfig,
        data: PreparedData,
        fit: np.ndarray,
        seed: int,
        device: torch.device,
    ):
        self.fit, self.train, self.data, self.device, self.loss_name = fit, train, data, device, loss_name
        classes, labels = np.unique(data.labels[fit], return_inverse=True)  # 0..C-1 for proxy losses
        self.labels = labels  # of the samples ``fit``, in its order; each epoch's go to the device at once
        self.model = build_model(model, seed, train.channels_last).to(device)
        self.loss_fn = create_loss(loss_name, len(classes), model.embedding_dim, **loss_params).to(device)
        trained = self.model.head if data.features else self.model  # feature mode: the trunk ran once
        self.optimizer = _optimizer(trained, self.loss_fn, train)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.sampler = create_sampler(train, labels, seed)
        self.generator = torch.Generator().manual_seed(seed)

    def train_epoch(self, epoch: int, inputs) -> float:
        """One epoch; the trunk stays frozen during the first ``warmup_epochs``. Returns the mean loss.

        No step waits for the device (on a GPU): the epoch's batches are drawn first and their rows of
        ``inputs`` and labels sent to the device in one copy (:meth:`_epoch_indices`); each step's loss stays
        there and all of them are read once, after the last step. A non-finite loss therefore ends the trial
        at the end of its epoch, not at its step: the steps after it train on non-finite values (nothing is
        kept: NonFiniteLossError is raised before the epoch is evaluated or saved), and the error names the
        first non-finite loss, the value a check at every step would have named."""
        self.sampler.set_epoch(epoch)
        self.model.train()
        self.model.set_trunk_trainable(not self.data.features and epoch > self.train.warmup_epochs)
        batches, rows, labels = self._epoch_indices(inputs)
        losses = []
        for step, batch in enumerate(batches):
            factor = lr_factor(self.train, epoch - 1 + step / len(batches))
            for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                group["lr"] = base_lr * factor
            x = _rows(inputs, rows[step]).to(self.device)
            with _autocast(self.train, self.device):
                if self.data.features:
                    out = self.model.embed_features(x)
                else:
                    out = self.model(
                        _channels_last(
                            train_transform(
                                x, self.generator, crop=self.train.crop_size, **self.data.geometry(self.fit[batch])
                            ),
                            self.train,
                        )
                    )
            loss = self.loss_fn(out.float(), labels[step])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.train.grad_clip is not None:
                torch.nn.utils.clip_grad_value_(self.model.parameters(), self.train.grad_clip)
            self.optimizer.step()
            losses.append(loss.detach())
        values = torch.stack(losses).tolist() if losses else []  # the epoch's one read of the device
        for step, value in enumerate(values):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"{self.loss_name}: training loss is {value} at epoch {epoch} (step {step + 1} of {len(values)})"
                )
        return float(np.mean(values))

    def _epoch_indices(self, inputs) -> tuple[np.ndarray, torch.Tensor | np.ndarray, torch.Tensor]:
        """The epoch's batches, drawn at once (the sampler's, in its order): positions in ``fit`` (steps × B,
        on the CPU, for the images' geometry), and the batches' rows of ``inputs`` and labels (steps × B each,
        int64) on the learner's device, sent there together in one non-blocking copy. For a memory map
        (inputs read on the CPU) the rows stay a NumPy array."""
        batches = np.asarray(list(self.sampler), dtype=np.int64)
        rows = self.fit[batches]
        packed = _indices(np.stack([rows, self.labels[batches]]), self.device)
        return batches, packed[0] if isinstance(inputs, torch.Tensor) else rows, packed[1]

    def loss_metrics(self) -> dict[str, float]:
        """What the loss reports about its own parameters (e.g. SoftTriple's effective centers)."""
        return self.loss_fn.trial_metrics() if hasattr(self.loss_fn, "trial_metrics") else {}

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])


def _optimizer(model: nn.Module, loss: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    groups = [{"params": list(model.parameters()), "lr": train.lr}]
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    if loss_params:  # proxies / centers learn in their own group with a larger lr
        groups.append({"params": loss_params, "lr": train.lr * train.loss_lr_mult})
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=train.momentum, weight_decay=train.weight_decay)
    adam = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return adam(groups, eps=train.eps, betas=train.betas, weight_decay=train.weight_decay)


def lr_factor(train: TrainConfig, t: float) -> float:
    """The lr multiplier after ``t`` epochs of training (fractional: steps count), from the recipe alone —
    a resumed trial needs no scheduler state. Warm-up ramps linearly to 1 over ``lr_warmup_epochs``; then
    ``step`` multiplies by ``lr_gamma`` every ``lr_step_epochs`` whole epochs (Proxy Anchor's StepLR) and
    ``cosine`` falls from 1 to 0 over the remaining epochs."""
    warmup = train.lr_warmup_epochs
    if t < warmup:
        return min(1.0, (t + 1e-3) / warmup)  # never exactly 0 on the first step
    if train.schedule == "step":
        return train.lr_gamma ** (int(t) // train.lr_step_epochs)
    if train.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(train.epochs - warmup, 1)))
    return 1.0


def create_sampler(train: TrainConfig, labels: np.ndarray, seed: int) -> MPerClassSampler | RandomBatchSampler:
    if train.sampler == "random":
        return RandomBatchSampler(len(labels), train.batch_size, seed)
    return MPerClassSampler(labels, train.m_per_class, train.batch_size, seed)


def _fit(
    learners: list[Learner],
    epochs: int,
    inputs,
    evaluate: Callable[[int], dict[str, float]],
    report: Callable[[dict], None] | None,
    checkpoint_dir: Storage | None,
) -> list[dict]:
    """Train ``learners`` side by side for ``epochs``, ``evaluate(epoch)`` after each epoch; with a
    ``checkpoint_dir``, resume from and save to it. Returns every epoch's result."""
    history: list[dict] = []
    state = load_state(checkpoint_dir)
    if state is not None:  # continue a crashed, retried or resumed trial
        for learner, learner_state in zip(learners, state["learners"], strict=True):
            learner.load_state_dict(learner_state)
        torch.set_rng_state(state["torch_rng"])
        history = state["history"]
        for result in history:  # the scheduler and the tracker see every epoch again
            if report is not None:
                report(dict(result))
    for epoch in range(len(history) + 1, epochs + 1):
        start = time.perf_counter()
        train_loss = float(np.mean([learner.train_epoch(epoch, inputs) for learner in learners]))
        result = evaluate(epoch)
        result.update(epoch=epoch, train_loss=train_loss, epoch_seconds=time.perf_counter() - start)
        history.append(result)
        if checkpoint_dir is not None:
            learner_states = [learner.state_dict() for learner in learners]
            state = {"learners": learner_states, "torch_rng": torch.get_rng_state(), "history": history}
            save_state(checkpoint_dir, state)
        if report is not None:
            report(dict(result))
    return history


def run_trial(
    model: ModelConfig,
    loss_name: str,
    loss_params: dict,
    train: TrainConfig,
    data: PreparedData,
    *,
    seed: int,
    report: Callable[[dict], None] | None = None,
    checkpoint_dir: Storage | None = None,
) -> dict[str, float]:
    """A search trial: ``loss_name`` with ``loss_params`` trained with ``train`` on each fold's training classes;
    after every epoch the validation metrics, averaged over the folds, are reported. Returns the last."""
    device = resolve_device(train.device)
    inputs = _on_device(data.inputs, device)
    learners = [Learner(model, loss_name, loss_params, train, data, fit, seed, device) for fit, _ in data.folds]

    def validate(epoch: int) -> dict[str, float]:
        results = []
        for learner, (_, val) in zip(learners, data.folds, strict=True):
            results.append(
                evaluate_split(learner.model, data, inputs, val, train, device, seed) | learner.loss_metrics()
            )
        result = _mean(results)
        if not math.isfinite(result["map_at_r"]):
            raise NonFiniteLossError(f"{loss_name}: validation metrics are not finite at epoch {epoch}")
        return result

    return _fit(learners, train.epochs, inputs, validate, report, checkpoint_dir)[-1]


def run_final(
    model: ModelConfig,
    loss_name: str,
    loss_params: dict,
    train: TrainConfig,
    data: PreparedData,
    *,
    seed: int,
    fold: int | None = None,
    report: Callable[[dict], None] | None = None,
    checkpoint_dir: Storage | None = None,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """A final-stage run: trained on every training class (or fold ``fold``'s training classes),
    evaluated once, after the last epoch, on the test classes. Returns the test metrics, named
    ``test_<metric>`` (:func:`study.vocab.as_test`), with the loss's own metrics (also in the last
    reported result), and the test embeddings (``test``, ``test_labels``, ``gallery``…)."""
    device = resolve_device(train.device)
    inputs = _on_device(data.inputs, device)
    fit = data.trainval if fold is None else data.folds[fold][0]
    learner = Learner(model, loss_name, loss_params, train, data, fit, seed, device)
    saved: dict[str, np.ndarray] = {}

    def test_once(epoch: int) -> dict[str, float]:
        if epoch < train.epochs:
            return {}
        result, embeddings = evaluate_test(learner.model, data, inputs, train, device, seed)
        saved.update(embeddings)
        return as_test(result) | learner.loss_metrics()  # test_<metric>: never mistaken for a validation score

    history = _fit([learner], train.epochs, inputs, test_once, report, checkpoint_dir)
    if not saved:  # every epoch was in the checkpoint: evaluate the restored model
        history[-1] |= test_once(train.epochs)
    return dict(history[-1]), saved
