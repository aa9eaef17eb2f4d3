"""The study schema: YAML + ``--set`` overrides → validated, typed objects.

Everything a study does is decided here, before anything starts: an unknown
key, a wrong type, a bound out of range, an unknown loss or dataset or a
missing file raises :class:`ConfigError` with one line naming the key and what
is allowed. Configs hold names, never classes, so they serialise unchanged to
YAML and MLflow. Fields that may carry credentials are ``SecretStr``: hidden in ``repr``, and
:meth:`StudyConfig.public_dump` (what ``config.yaml`` and MLflow get) redacts them, found by type.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from study.claims import CLAIMS
from study.data import DATASETS, dataset_options, index_dataset
from study.data.images import DatasetLayoutError
from study.losses import LOSSES
from study.redaction import is_redacted, redact, redact_text
from study.search_space import Param, SearchSpace, describe_validation_error, load_search_space
from study.storage import Storage

OBJECTIVES = ("map_at_r", "recall_at_1")
BUILTIN_SPACES = Path(__file__).resolve().parent.parent / "search_spaces"


class ConfigError(ValueError):
    """A user error in a study file or override: one line, no traceback."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Strict):
    name: str = "synthetic"
    root: Path | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    val_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    folds: int | None = Field(None, ge=2)  # k class-disjoint validation folds instead of val_fraction
    image_size: int = Field(256, ge=16)  # image datasets: decoded once with the shorter side at this size
    max_aspect: float = Field(2.0, ge=1.0)  # image datasets: the longer side kept up to max_aspect × image_size
    cache_dir: Path | None = None  # where decoded images are cached; default ~/.cache/dml-study

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
        return name


# timm.create_model arguments the embedding network sets itself (study.models.embedding)
TIMM_RESERVED = ("num_classes", "global_pool", "pretrained", "pretrained_cfg_overlay", "fc_norm")


class ModelConfig(_Strict):
    backbone: str = "resnet10t"
    # keyword arguments of timm.create_model for the trunk, e.g. a narrower ResNet
    # ({channels: [32, 64, 128, 256], stem_width: 16}); not the ones dml-study sets itself (TIMM_RESERVED)
    backbone_options: dict[str, Any] = Field(default_factory=dict)
    pretrained: bool | Literal["hub"] | Path = False
    embedding_dim: int = Field(64, ge=2)
    pooling: Literal["avg", "max", "avgmax", "token"] = "avg"  # token: ViT/DeiT class token
    freeze_bn: bool = False  # BatchNorm keeps its pretrained statistics and affine parameters


class TrainConfig(_Strict):
    """The training recipe, the same for every loss of a study (only ``loss_lr_mult``, the lr
    multiplier of a loss's own parameters, belongs to a loss's search space)."""

    epochs: int = Field(3, ge=1)
    batch_size: int = Field(64, ge=2)
    # m_per_class: batch_size / m classes with m samples each; random: shuffled batches (SoftTriple's)
    sampler: Literal["m_per_class", "random"] = "m_per_class"
    m_per_class: int = Field(4, ge=2)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    loss_lr_mult: float = Field(1.0, gt=0.0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"  # adam: L2 weight decay; adamw: decoupled
    eps: float = Field(1e-8, gt=0.0)  # Adam/AdamW (SoftTriple's authors: 0.01)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam/AdamW
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # SGD
    # lr over the epochs (both parameter groups alike): constant, × lr_gamma every lr_step_epochs
    # (Proxy Anchor's StepLR), or a cosine to 0; the first lr_warmup_epochs ramp it up linearly per step
    schedule: Literal["constant", "step", "cosine"] = "constant"
    lr_step_epochs: int = Field(10, ge=1)
    lr_gamma: float = Field(0.5, gt=0.0, le=1.0)
    lr_warmup_epochs: int = Field(0, ge=0)
    eval_batch_size: int = Field(256, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # finetune: the whole network trains on augmented images; features: the frozen trunk runs once,
    # its features are cached and trials train only the embedding head and the loss (cheap, broad searches)
    mode: Literal["finetune", "features"] = "finetune"
    crop_size: int | None = Field(None, ge=8)  # random resized crop (train) / center crop (eval); None: pad-crop
    warmup_epochs: int = Field(0, ge=0)  # first epochs with the trunk frozen (Proxy Anchor's recipe)
    grad_clip: float | None = Field(None, gt=0.0)  # clip every gradient value to ±grad_clip
    amp: bool = False  # bf16 autocast on CUDA (losses compute in float32 regardless)
    channels_last: bool = False  # CUDA CNNs: channels-last memory format


class FinalConfig(_Strict):
    """After the search: each loss's best configuration retrained ``seeds`` times (per fold with
    folds) on the training classes and evaluated once on the test classes."""

    seeds: int = Field(3, ge=0)  # 0: no final stage
    epochs: int | None = Field(None, ge=1)  # default: train.epochs
    # all: each seed trains on every training class, as the papers do; folds (with dataset.folds): one model
    # per validation fold, their mean and their concatenated-embedding ensemble (the Reality Check protocol)
    train_on: Literal["all", "folds"] = "all"


class SearchConfig(_Strict):
    losses: list[str] = Field(min_length=1)
    trials_per_loss: int = Field(6, ge=1)
    objective: Literal["map_at_r", "recall_at_1"] = "map_at_r"
    max_concurrent: int = Field(2, ge=1)  # per loss: TPE degrades with many parallel suggestions
    # trials at once across the study (every loss's search and final runs share the cluster), and how many
    # get a worker started at once; None: as many as the cluster's live nodes hold when the study starts
    max_concurrent_total: int | None = Field(None, ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    max_retries: int = Field(1, ge=0)  # a trial that raises restarts from its last epoch this often
    # true: a trial starts in the worker a finished trial leaves (its imports and loaded data kept). Ray Tune
    # then gives the next trial to that worker even while a new worker is starting for it, so trials
    # shorter than a worker's start-up all run in one worker; false: a fresh worker per trial
    reuse_actors: bool = True
    # Optuna's storage: None = a journal file in the study folder; or an RDB URL (sqlite:///…,
    # postgresql://…) shared by many drivers. May carry credentials: logged and saved redacted.
    optuna_storage: SecretStr | None = Field(None, json_schema_extra={"env": "DML_STUDY_OPTUNA_STORAGE"})
    space_dir: Path | None = None
    # training settings searched for every loss alike: {lr: {type: float, low: …, high: …, log: true}, …};
    # the default (the first trial's value) is always the study's train.<key>
    train: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("losses")
    @classmethod
    def _known(cls, losses: list[str]) -> list[str]:
        for name in losses:
            if name not in LOSSES:
                raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(sorted(LOSSES))}")
        if len(set(losses)) != len(losses):
            raise ValueError("a loss is listed twice")
        return losses


class Resources(_Strict):
    cpu: float = Field(1.0, gt=0.0)
    gpu: float = Field(0.0, ge=0.0)


class TrackingConfig(_Strict):
    # MLflow's tracking URI (MLFLOW_TRACKING_URI wins); may carry credentials: logged and saved redacted
    uri: SecretStr | None = Field(None, json_schema_extra={"env": "MLFLOW_TRACKING_URI"})


class StudyConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)  # a folder and run name
    output_dir: str = "runs"  # a folder, or an object-store URI (s3://bucket/runs)
    seed: int = 0
    dataset: DatasetConfig = DatasetConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    search: SearchConfig
    final: FinalConfig = FinalConfig()
    # the ablation stage: each claim of study.claims about the study's losses as a paired experiment
    # (the best configuration vs. it with the claim's factor changed, the final stage's seeds): true for
    # every claim that applies, false for none, or a list of claim ids (``study.claims.CLAIMS``) to run only those
    ablations: bool | list[str] = True
    resources: Resources = Resources()
    tracking: TrackingConfig = TrackingConfig()

    @property
    def storage(self) -> Storage:
        """The study's folder: ``<output_dir>/<name>``."""
        return Storage.at(self.output_dir).child(self.name)

    def public_dump(self) -> dict:
        """What ``config.yaml`` and MLflow get: :func:`public_dump` of this config."""
        return public_dump(self)


def public_dump(model: BaseModel) -> dict:
    """``model`` as JSON-compatible values, every secret (a ``SecretStr`` anywhere in it, found by
    type: :func:`secret_fields`) with its credentials redacted (:func:`~study.redaction.redact`).
    A value without credentials is kept as it is."""
    dumped = model.model_dump(mode="json")
    for path, secret in secret_fields(model).items():
        *parents, leaf = path
        node = dumped
        for part in parents:
            node = node[part]
        node[leaf] = redact(secret.get_secret_value())
    return dumped


def secret_fields(value: Any, path: tuple = ()) -> dict[tuple, SecretStr]:
    """Every ``SecretStr`` in ``value`` (a model; nested models, lists and dicts followed) by its path."""
    if isinstance(value, SecretStr):
        return {path: value}
    if isinstance(value, BaseModel):
        items = ((name, getattr(value, name)) for name in type(value).model_fields)
    elif isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return {}
    return {key: secret for part, v in items for key, secret in secret_fields(v, (*path, part)).items()}


def secret_env(path: tuple) -> str:
    """The environment variable that holds the real value of the secret at ``path``: its field's
    ``env`` (``DML_STUDY_OPTUNA_STORAGE``, ``MLFLOW_TRACKING_URI``), else ``DML_STUDY_<DOTTED_KEY>``."""
    model: Any = StudyConfig
    field = None
    for part in path:
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}
        field = fields.get(part)
        model = field.annotation if field else None
    env = (field.json_schema_extra or {}).get("env") if field else None
    return env or "DML_STUDY_" + "_".join(map(str, path)).upper()


def restore_secrets(cfg: StudyConfig, environ: dict[str, str]) -> StudyConfig:
    """``cfg`` (read from a study folder's ``config.yaml``) with each redacted secret replaced by
    the value of its environment variable (:func:`secret_env`); ConfigError (one line, naming the
    key and the variable) if that is not set."""
    for path, value in secret_fields(cfg).items():
        if not is_redacted(value.get_secret_value()):
            continue
        env = secret_env(path)
        if not environ.get(env):
            key = ".".join(map(str, path))
            raise ConfigError(f"{key}: saved redacted (credentials are never written); set {env} to its full value")
        cfg = _replace(cfg, path, SecretStr(environ[env]))
    return cfg


def without_secrets(cfg: StudyConfig) -> StudyConfig:
    """``cfg`` with every secret's credentials redacted: what Ray gets (its workers never need them,
    and Ray pickles a trial's parameters into its experiment state and temp folder)."""
    for path, value in secret_fields(cfg).items():
        cfg = _replace(cfg, path, SecretStr(redact(value.get_secret_value())))
    return cfg


def _replace(value: Any, path: tuple, new: Any) -> Any:
    """``value`` with the item at ``path`` (model fields, dict keys, list indices) replaced by ``new``."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, BaseModel):
        return value.model_copy(update={head: _replace(getattr(value, head), rest, new)})
    changed = dict(value) if isinstance(value, dict) else list(value)
    changed[head] = _replace(value[head], rest, new)
    return type(value)(changed)


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` override (value parsed as YAML) in place."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. train.epochs=2")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    node[leaf] = yaml.safe_load(value)


OUTPUT_DIR_ENV = "DML_STUDY_OUTPUT_DIR"  # output_dir for studies that do not set it


def load_study(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    """Read, override and validate a study file. Raises ConfigError on user errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: study file not found")
    return parse_study(path.read_text(), str(path), overrides, space_dir=path.resolve().parent)


def parse_study(text: str, path: str, overrides: list[str] = (), space_dir: Path | None = None) -> StudyConfig:
    """Validate the study YAML ``text`` (from ``path``, named in errors); search spaces default
    to ``space_dir``, then the built-in ones."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of study settings at the top level")
    for assignment in overrides:
        apply_override(raw, assignment)
    if "output_dir" not in raw and os.environ.get(OUTPUT_DIR_ENV):  # set once for a cluster
        raw["output_dir"] = os.environ[OUTPUT_DIR_ENV]
    if space_dir is not None:
        raw.setdefault("search", {}).setdefault("space_dir", str(space_dir))
    try:
        cfg = StudyConfig.model_validate(raw)
    except ValidationError as err:
        # the input a message quotes may be a URL with credentials
        raise ConfigError(redact_text(describe_validation_error(str(path), err, StudyConfig))) from None
    try:
        _check_dataset(cfg.dataset)
        _check_model(cfg.model)
        if "://" in cfg.output_dir and not cfg.search.optuna_storage:
            raise ConfigError(
                "output_dir: an object store needs search.optuna_storage (a database URL): "
                "Optuna's journal needs a file system"
            )
        if cfg.train.sampler == "m_per_class" and cfg.train.batch_size % cfg.train.m_per_class:
            raise ConfigError(
                f"train.batch_size ({cfg.train.batch_size}) must be a multiple of "
                f"train.m_per_class ({cfg.train.m_per_class})"
            )
        shared_space(cfg)
        if cfg.final.train_on == "folds" and cfg.dataset.folds is None:
            raise ConfigError("final.train_on: folds needs dataset.folds (validation folds to train on); or use all")
        if cfg.train.warmup_epochs >= cfg.train.epochs:
            raise ConfigError(f"train.warmup_epochs ({cfg.train.warmup_epochs}) must be below train.epochs")
        if cfg.dataset.name != "synthetic" and (cfg.train.crop_size or 0) > cfg.dataset.image_size:
            raise ConfigError(
                f"train.crop_size ({cfg.train.crop_size}) must not exceed dataset.image_size ({cfg.dataset.image_size})"
            )
        _check_ablations(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    search_spaces(cfg)  # every loss's space must load and fit the loss; errors name the space file
    return cfg


# Training settings every loss shares, searchable only through the study's search.train (equal tuning);
# a loss's own space may search only LOSS_SEARCHABLE_TRAIN, the lr multiplier of its own parameters.
SHARED_SEARCHABLE_TRAIN = (
    "lr",
    "weight_decay",
    "optimizer",
    "eps",
    "momentum",
    "schedule",
    "lr_step_epochs",
    "lr_gamma",
    "lr_warmup_epochs",
    "sampler",
)
LOSS_SEARCHABLE_TRAIN = ("loss_lr_mult",)


def shared_space(cfg: StudyConfig) -> dict[str, Param]:
    """The study-level search space of shared training settings, each defaulting to the study's value:
    identical for every loss, so the first trial of every loss trains with the study's recipe."""
    params = {}
    for name, spec in cfg.search.train.items():
        key = f"search.train.{name}"
        if name not in SHARED_SEARCHABLE_TRAIN:
            raise ConfigError(f"{key}: not a shared training setting; allowed: {', '.join(SHARED_SEARCHABLE_TRAIN)}")
        study_value = getattr(cfg.train, name)
        if "default" in spec and spec["default"] != study_value:
            raise ConfigError(
                f"{key}.default: must be the study's train.{name} ({study_value!r}) or left out "
                f"(got {spec['default']!r})"
            )
        try:
            params[name] = Param.model_validate({**spec, "default": study_value})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join([key, *map(str, first["loc"])])
            raise ConfigError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
    return params


def _check_ablations(cfg: StudyConfig) -> None:
    """A list of claims to ablate names claims about the study's losses (whether the loss's space
    searches the claim's factor is the ablation plan's business: it says why a claim is skipped)."""
    if isinstance(cfg.ablations, bool):
        return
    about = [c.id for c in CLAIMS if c.loss in cfg.search.losses]
    for claim in cfg.ablations:
        if claim not in about:
            allowed = ", ".join(about) if about else "none: no claim is about the study's losses"
            raise ConfigError(f"ablations: {claim!r} is not a claim about the study's losses; allowed: {allowed}")


def _check_dataset(ds: DatasetConfig) -> None:
    allowed = dataset_options(ds.name)
    for key in ds.options:
        if key not in allowed:
            raise ConfigError(f"dataset.options.{key}: unknown option; allowed: {', '.join(allowed)}")
    if ds.root is not None and not ds.root.exists():
        raise ConfigError(f"dataset.root: {ds.root} does not exist")
    if ds.name != "synthetic":  # read the index files now: a wrong folder fails before any trial
        try:
            index_dataset(ds.name, ds.root, **ds.options)
        except (DatasetLayoutError, ValueError) as exc:
            raise ConfigError(str(exc).splitlines()[0]) from None


def _check_model(model: ModelConfig) -> None:
    import timm  # imported here: timm is slow to import and only needed once a study runs

    if not timm.is_model(model.backbone):
        raise ConfigError(
            f"model.backbone: unknown timm model {model.backbone!r}; see timm.list_models() for the allowed names"
        )
    reserved = sorted(set(model.backbone_options) & set(TIMM_RESERVED))
    if reserved:
        raise ConfigError(
            f"model.backbone_options: {', '.join(reserved)} is set by dml-study (model.pooling, model.pretrained)"
        )
    if model.backbone_options:
        import torch

        try:
            with torch.device("meta"):  # no memory, no weights: only whether timm accepts the options
                timm.create_model(model.backbone, num_classes=0, **model.backbone_options)
        except Exception as err:  # noqa: BLE001 - timm raises TypeError, ValueError, AssertionError…
            raise ConfigError(
                f"model.backbone_options: timm cannot build {model.backbone} with {model.backbone_options} "
                f"({err.__class__.__name__}: {err})"
            ) from None
    if isinstance(model.pretrained, Path) and not model.pretrained.is_file():
        raise ConfigError(f"model.pretrained: weights file {model.pretrained} not found")


def search_spaces(cfg: StudyConfig) -> dict[str, SearchSpace]:
    """The search space of each loss: ``<space_dir>/<loss>.yaml``, else the built-in one."""
    spaces, shared = {}, shared_space(cfg)
    for loss in cfg.search.losses:
        candidates = [cfg.search.space_dir / f"{loss}.yaml"] if cfg.search.space_dir else []
        candidates.append(BUILTIN_SPACES / f"{loss}.yaml")
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise ConfigError(f"search.losses: no search space file {loss}.yaml in {candidates[0].parent}")
        try:
            space = load_search_space(path, searchable_train=LOSS_SEARCHABLE_TRAIN)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if space.loss != loss:
            raise ConfigError(f"{path}: loss: expected {loss!r}, got {space.loss!r}")
        spaces[loss] = space.with_shared(shared)
    return spaces
