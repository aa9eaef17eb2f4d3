"""Search spaces: typed parameters in YAML, compiled into an Optuna define-by-run function.

A file ``search_spaces/<loss>.yaml`` looks like::

    loss: multi_similarity
    params:                 # keyword arguments of the loss
      alpha: {type: float, low: 0.5, high: 10.0, log: true, default: 2.0}
      positive: {type: categorical, choices: [all, easy], default: all}
      ...
    train:                  # the lr multiplier of the loss's own parameters (proxies, centers)
      loss_lr_mult: {type: float, low: 1.0, high: 300.0, log: true, default: 100.0}

Training settings that every loss shares (lr, weight decay, the schedule) are
never in a loss's file: the study's ``search.train`` searches them for every
loss alike (:meth:`SearchSpace.with_shared`), defaulting to the study's values.

``default`` is the paper's value; the defaults form the first trial of every
search. ``when: {other: [values]}`` makes a parameter conditional: it is only
sampled when an earlier parameter took one of those values. ``zero: true`` on a
log-scale float also allows exactly 0 (e.g. a penalty weight, 0 = off): Optuna
first draws the categorical ``<name>_is_zero``, then the log-scale value if not.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import optuna
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from study.losses import loss_hyperparameters


class Param(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    zero: bool = False
    default: Any
    when: dict[str, list[Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Param:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
            if self.default not in self.choices:
                raise ValueError(f"default {self.default!r} is not one of {self.choices}")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs 'low' and 'high'")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("'step' and 'log' cannot be combined")
        if self.zero and not (self.type == "float" and self.log):
            raise ValueError("'zero' is for log-scale floats (other ranges can include 0 directly)")
        if not isinstance(self.default, (int, float)) or isinstance(self.default, bool):
            raise ValueError(f"default must be a number (got {self.default!r})")
        if self.zero and self.default == 0:
            return self
        if not self.low <= self.default <= self.high:
            raise ValueError(f"default {self.default} is outside [{self.low}, {self.high}]")
        if self.type == "int" and not all(float(v).is_integer() for v in (self.low, self.high, self.default)):
            raise ValueError("int parameters need integer low, high and default")
        return self

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if self.zero and trial.suggest_categorical(f"{name}{ZERO_FLAG}", [False, True]):
            return 0.0
        if self.type == "categorical":
            return trial.suggest_categorical(name, self.choices)
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)


class _SpaceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loss: str
    paper: str | None = None
    params: dict[str, Param] = Field(default_factory=dict)
    train: dict[str, Param] = Field(default_factory=dict)


class SearchSpace:
    """One loss's search space: which parameters, their ranges, conditions and defaults."""

    def __init__(self, loss: str, params: dict[str, Param], train: dict[str, Param]):
        self.loss = loss
        self.loss_params = params
        self.train_params = train
        self.params = {**params, **train}  # insertion order = sampling order

    def define_by_run(self, trial: optuna.Trial) -> None:
        """Sample every active parameter (conditions are checked on earlier values)."""
        values: dict[str, Any] = {}
        for name, param in self.params.items():
            if all(values.get(dep, _UNSET) in allowed for dep, allowed in param.when.items()):
                values[name] = param.suggest(trial, name)

    def to_optuna(self, values: dict[str, Any]) -> dict[str, Any]:
        """Parameter values → the Optuna parameters that produce them (for enqueueing a point)."""
        params = dict(values)
        for name, param in self.params.items():
            if param.zero and name in values:
                params[f"{name}{ZERO_FLAG}"] = values[name] == 0
                if values[name] == 0:
                    del params[name]
        return params

    def from_optuna(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's Optuna parameters → parameter values (inverse of ``to_optuna``)."""
        values = {k: v for k, v in params.items() if not k.endswith(ZERO_FLAG)}
        for name, param in self.params.items():
            if param.zero and params.get(f"{name}{ZERO_FLAG}"):
                values[name] = 0.0
        return values

    def defaults(self) -> dict[str, Any]:
        """The paper's defaults, restricted to the parameters active under them."""
        values: dict[str, Any] = {}
        for name, param in self.params.items():
            if all(values.get(dep, _UNSET) in allowed for dep, allowed in param.when.items()):
                values[name] = param.default
        return values

    def with_shared(self, shared: dict[str, Param]) -> SearchSpace:
        """This space plus the study's shared training settings (sampled after the loss's own)."""
        return SearchSpace(self.loss, self.loss_params, {**self.train_params, **shared})

    def dump(self) -> dict[str, dict[str, Any]]:
        """Every parameter's definition (type, bounds, scale, default, condition) as JSON values, by name."""
        return {name: param.model_dump(mode="json") for name, param in self.params.items()}

    def split(self, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Parameter values → (loss keyword arguments, training-setting overrides)."""
        loss_kwargs = {k: v for k, v in values.items() if k in self.loss_params}
        train = {k: v for k, v in values.items() if k in self.train_params}
        return loss_kwargs, train


_UNSET = object()
ZERO_FLAG = "_is_zero"


def load_search_space(path: str | Path, searchable_train: Sequence[str]) -> SearchSpace:
    """Load and check a search-space file; ValueError names the file, the key and what is allowed."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
        spec = _SpaceFile.model_validate(raw)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    except ValidationError as err:
        raise ValueError(describe_validation_error(str(path), err, _SpaceFile)) from None
    try:
        allowed = loss_hyperparameters(spec.loss)
    except ValueError as exc:
        raise ValueError(f"{path}: loss: {exc}") from None
    for name in spec.params:
        if name not in allowed:
            raise ValueError(
                f"{path}: params.{name}: not a hyperparameter of {spec.loss}; allowed: {', '.join(allowed)}"
            )
    for name in spec.train:
        if name not in searchable_train:
            raise ValueError(
                f"{path}: train.{name}: not searchable in a loss's space; allowed: {', '.join(searchable_train)} "
                "(settings every loss shares, such as lr and weight_decay, are searched for all losses alike "
                "in the study's search.train)"
            )
    seen: dict[str, Param] = {}
    for name, param in {**spec.params, **spec.train}.items():
        for dep, values in param.when.items():
            if dep not in seen:
                raise ValueError(f"{path}: {name}.when: {dep!r} must be a parameter listed before {name!r}")
            bad = [v for v in values if not _admits(seen[dep], v)]
            if bad:
                raise ValueError(f"{path}: {name}.when.{dep}: {bad} can never be sampled for {dep!r}")
        seen[name] = param
    return SearchSpace(spec.loss, dict(spec.params), dict(spec.train))


def _admits(param: Param, value: Any) -> bool:
    if param.type == "categorical":
        return value in param.choices
    if param.zero and value == 0:
        return True
    return isinstance(value, (int, float)) and param.low <= value <= param.high


def describe_validation_error(source: str, err: ValidationError, model: type[BaseModel]) -> str:
    """One line for the first error of ``err``: the file, the dotted key, what is wrong or allowed."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        allowed = _fields_at(model, first["loc"][:-1])
        return f"{source}: unknown key {key!r}" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    msg = first["msg"].removeprefix("Value error, ")
    return f"{source}: {key}: {msg} (got {first.get('input')!r})"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the nested model at ``loc`` (dict values are followed through their keys)."""
    annotation: Any = model
    for part in loc:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            annotation = field.annotation if field else None
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        else:
            return []
    return list(annotation.model_fields) if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []
