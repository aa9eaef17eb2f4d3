"""Config validation at the edge: exit code 2, one line naming the key, nothing written."""

from __future__ import annotations

from functools import partial

import pytest
import yaml
from typer.testing import CliRunner

from study.claims import ablation_plan
from study.cli import app
from study.config import ConfigError, load_study, search_spaces
from study.losses import LOSSES
from tests.conftest import REPO, TINY_STUDY, write_study

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, ["run", *map(str, args)])


def _assert_rejected(result, *fragments, folder):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    written = sorted(p.name for p in folder.iterdir())
    assert written == ["study.yaml"] or written == ["spaces", "study.yaml"], written


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"bogus": 1}, ["unknown key 'bogus'", "allowed: name, output_dir"]),
        ({"train": {**TINY_STUDY["train"], "epoch": 3}}, ["unknown key 'train.epoch'", "allowed: epochs"]),
        ({"train": {**TINY_STUDY["train"], "epochs": "three"}}, ["train.epochs", "'three'"]),
        ({"train": {**TINY_STUDY["train"], "epochs": 0}}, ["train.epochs", "greater than or equal to 1"]),
        ({"search": {**TINY_STUDY["search"], "losses": ["nope"]}}, ["unknown loss 'nope'", "multi_similarity"]),
        ({"search": {**TINY_STUDY["search"], "objective": "acc"}}, ["search.objective", "map_at_r"]),
        ({"dataset": {"name": "imagenet"}}, ["unknown dataset 'imagenet'", "synthetic"]),
        ({"dataset": {"name": "synthetic", "options": {"colours": 3}}}, ["dataset.options.colours", "num_classes"]),
        ({"dataset": {"name": "synthetic", "root": "/no/such/dir"}}, ["dataset.root", "/no/such/dir"]),
        ({"model": {"backbone": "no_such_net"}}, ["model.backbone", "no_such_net"]),
        ({"model": {"backbone": "test_resnet", "pretrained": "/no/w.pth"}}, ["model.pretrained", "/no/w.pth"]),
        (
            {"model": {"backbone": "resnet10t", "backbone_options": {"global_pool": "max"}}},
            ["model.backbone_options: global_pool is set by dml-study"],
        ),
        (
            {"model": {"backbone": "resnet10t", "backbone_options": {"widthz": 2}}},
            ["model.backbone_options: timm cannot build resnet10t with {'widthz': 2}", "widthz"],
        ),
        ({"train": {**TINY_STUDY["train"], "batch_size": 18}}, ["batch_size (18)", "m_per_class (4)"]),
        ({"train": {**TINY_STUDY["train"], "optimizer": "lamb"}}, ["train.optimizer", "'adamw', 'adam' or 'sgd'"]),
        ({"train": {**TINY_STUDY["train"], "schedule": "poly"}}, ["train.schedule", "'constant', 'step' or 'cosine'"]),
        ({"final": {"train_on": "folds"}}, ["final.train_on: folds needs dataset.folds"]),
        (
            {"ablations": ["soft_triple.centers"]},
            [
                "ablations: 'soft_triple.centers' is not a claim about the study's losses",
                "allowed: multi_similarity.mining, multi_similarity.easy_positives",
            ],
        ),
        (
            {"search": {**TINY_STUDY["search"], "train": {"epochs": {"type": "int", "low": 1, "high": 3}}}},
            ["search.train.epochs: not a shared training setting", "allowed: lr, weight_decay"],
        ),
        (
            {"search": {**TINY_STUDY["search"], "train": {"lr": {"type": "float", "low": 1e-5, "high": 1e-4}}}},
            ["search.train.lr", "default 0.001 is outside [1e-05, 0.0001]"],
        ),
        (
            {
                "search": {
                    **TINY_STUDY["search"],
                    "train": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "default": 3e-3}},
                }
            },
            ["search.train.lr.default: must be the study's train.lr (0.001)"],
        ),
    ],
)
def test_bad_study_is_rejected_with_one_line(workdir, changes, fragments):
    _assert_rejected(_run(write_study(workdir, **changes)), *fragments, folder=workdir)


def test_an_ablations_list_runs_only_the_claims_it_names(tmp_path):
    cfg = load_study(write_study(tmp_path), ["ablations=[multi_similarity.easy_positives]"])
    space = search_spaces(cfg)["multi_similarity"]
    assert {"mining", "positive"} <= set(space.params)  # both MS claims could be ablated
    plan = partial(ablation_plan, seeds=3, train_on="all")
    assert [c.id for c in plan("multi_similarity", space.params, ablations=True)[0]] == [
        "multi_similarity.mining",
        "multi_similarity.easy_positives",
    ]
    claims, why = plan("multi_similarity", space.params, ablations=cfg.ablations)
    assert [c.id for c in claims] == ["multi_similarity.easy_positives"]
    assert why == "1 claim × 3 seeds: easy_positives"
    assert plan("multi_similarity", space.params, ablations=["triplet.easy_positives"]) == (
        [],
        "none of its claims is in the study's ablations list",
    )


def test_bad_search_space_names_file_and_key(workdir):
    spaces = workdir / "spaces"
    spaces.mkdir()
    bad = {"loss": "multi_similarity", "params": {"alpha": {"type": "float", "low": 5, "high": 1, "default": 2}}}
    (spaces / "multi_similarity.yaml").write_text(yaml.safe_dump(bad))
    path = write_study(workdir, search={**TINY_STUDY["search"], "space_dir": str(spaces)})
    _assert_rejected(
        _run(path), "multi_similarity.yaml", "params.alpha", "low (5.0) is above high (1.0)", folder=workdir
    )


def test_missing_file_and_bad_override(workdir):
    result = _run(workdir / "missing.yaml")
    assert result.exit_code == 2 and "missing.yaml: study file not found" in result.output
    path = write_study(workdir)
    _assert_rejected(_run(path, "--set", "train.epochs"), "expected key=value", folder=workdir)
    _assert_rejected(_run(path, "--set", "train.nope=1"), "unknown key 'train.nope'", folder=workdir)


def test_overrides_are_typed_and_nested(tmp_path):
    path = write_study(tmp_path)
    cfg = load_study(path, ["train.epochs=5", "search.losses=[normalized_softmax]", "model.pretrained=hub"])
    assert cfg.train.epochs == 5
    assert cfg.search.losses == ["normalized_softmax"]
    assert cfg.model.pretrained == "hub"
    assert cfg.search.space_dir == tmp_path  # spaces next to the study file come first


def test_output_dir_from_the_environment_unless_the_study_sets_it(workdir, monkeypatch):
    monkeypatch.setenv("DML_STUDY_OUTPUT_DIR", "s3://bucket/runs")
    assert (
        load_study(write_study(workdir, search={**TINY_STUDY["search"], "optuna_storage": "sqlite:///o.db"})).output_dir
        == "s3://bucket/runs"
    )
    assert load_study(write_study(workdir, output_dir="elsewhere")).output_dir == "elsewhere"
    assert load_study(write_study(workdir), ["output_dir=cli"]).output_dir == "cli"


def test_existing_study_folder_is_never_overwritten_silently(workdir):
    path = write_study(workdir, output_dir=str(workdir / "out"))
    marker = workdir / "out" / "tiny" / "keep.txt"
    marker.parent.mkdir(parents=True)
    marker.write_text("x")
    result = _run(path)
    assert result.exit_code == 2 and "--new" in result.output
    assert marker.read_text() == "x"


def test_every_preset_validates(tmp_path):
    """Image-dataset presets need only the data path (checked here on a fixture tree in that layout)."""
    from tests.test_data_datasets import FIXTURES

    presets = [p for p in (REPO / "search_spaces").glob("*.yaml") if "name" in (yaml.safe_load(p.read_text()) or {})]
    assert {"quickstart.yaml", "cub200.yaml", "cars196.yaml", "sop.yaml", "inshop.yaml"} <= {p.name for p in presets}
    for preset in presets:
        dataset = yaml.safe_load(preset.read_text())["dataset"]["name"]
        overrides = []
        if dataset != "synthetic":
            with pytest.raises(ConfigError, match=f"dataset.root: the {dataset} dataset needs the folder it is in"):
                load_study(preset)
            overrides = [f"dataset.root={FIXTURES[dataset](tmp_path / dataset).root}"]
        try:
            cfg = load_study(preset, overrides)
        except ConfigError as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"{preset.name}: {exc}")
        if dataset != "synthetic":
            assert (cfg.train.crop_size, cfg.dataset.image_size, cfg.model.pretrained) == (224, 256, "hub")
            assert (cfg.train.lr, cfg.train.optimizer, cfg.train.schedule) == (1e-4, "adamw", "step")
        _assert_equal_tuning(load_study(preset, [*overrides, f"search.losses={list(LOSSES)}"]))


def _assert_equal_tuning(cfg) -> None:
    """Every loss's first trial (its space's defaults) trains with the study's lr, weight decay and
    schedule; only the lr multiplier of a loss's own parameters is the loss's."""
    for loss, space in search_spaces(cfg).items():
        _, overrides = space.split(space.defaults())
        train = cfg.train.model_copy(update=overrides)
        assert train.model_dump(exclude={"loss_lr_mult"}) == cfg.train.model_dump(exclude={"loss_lr_mult"}), loss
        assert set(space.train_params) <= {"loss_lr_mult"}, loss


def test_a_study_level_train_space_is_the_same_for_every_loss(tmp_path):
    lr = {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}
    wd = {"type": "float", "low": 0.0, "high": 1e-3}
    path = write_study(tmp_path, search={**TINY_STUDY["search"], "train": {"lr": lr, "weight_decay": wd}})
    cfg = load_study(path, [f"search.losses={list(LOSSES)}"])
    spaces = search_spaces(cfg)
    for space in spaces.values():
        assert space.train_params["lr"] == spaces["triplet"].train_params["lr"]
        assert space.train_params["lr"].default == cfg.train.lr == 1e-3
        assert space.train_params["weight_decay"].default == cfg.train.weight_decay
        assert space.defaults()["lr"] == cfg.train.lr
