"""The shared vocabulary: keys round-trip, the layout is where the study folder says, formats agree."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from study.storage import Storage
from study.vocab import (
    Stage,
    State,
    TrialKey,
    checkpoint_dir,
    embeddings_bytes,
    embeddings_file,
    read_embeddings,
)

KEYS = [
    (TrialKey.baseline(), "baseline"),
    (TrialKey.search("multi_similarity", 0), "multi_similarity/0"),
    (TrialKey.search("soft_triple", 17), "soft_triple/17"),
    (TrialKey.final("pddm", 0, 3), "pddm/final/0/s3"),
    (TrialKey.final("pddm", 12, 3, fold=2), "pddm/final/12/s3-f2"),
    (TrialKey.ensemble("proxy_anchor", 5, 1), "proxy_anchor/ensemble/5/s1"),
    (TrialKey.ablation("multi_similarity", 4, "mining", 2), "multi_similarity/ablation/4/mining/s2"),
]


@pytest.mark.parametrize(("key", "text"), KEYS)
def test_keys_are_spelled_once_and_parse_back(key, text):
    assert str(key) == text
    assert TrialKey.parse(text) == key
    assert key.run_name == text.replace("/", "-")


@pytest.mark.parametrize(
    "text",
    [
        *("", "ms", "ms/x", "ms/-1", "ms/final", "ms/final/3", "ms/final/s", "ms/final/s1-f", "ms/search/s1"),
        *("ms/final/s1", "ms/final/x/s1", "ms/final/-1/s1", "ms/final/01/s1", "ms/ensemble/2/s1-f0", "a/b/c/d/e/f"),
        *("ms/ablation/1/s1", "ms/ablation/1//s1", "ms/ablation/x/mining/s1", "ms/ablation/1/mining/s1-f0"),
    ],
)
def test_anything_else_is_not_a_key(text):
    with pytest.raises(ValueError, match="not a trial key"):
        TrialKey.parse(text)


def test_states_and_stages_are_the_strings_mlflow_holds():
    assert [s.value for s in State] == ["COMPLETE", "PRUNED", "FAIL", "RUNNING"]
    assert [s.value for s in Stage] == ["baseline", "search", "final", "ablation", "ensemble"]
    assert State.COMPLETE == "COMPLETE" and f"{Stage.FINAL}" == "final"


def test_layout(tmp_path):
    storage = Storage.at(tmp_path / "study")
    assert checkpoint_dir(storage, TrialKey.search("ms", 4)).root == str(tmp_path / "study/checkpoints/ms/4")
    assert embeddings_file(storage, TrialKey.final("ms", 7, 1, 0)).root == str(
        tmp_path / "study/embeddings/ms/final/7/s1-f0.npz"
    )


def test_embeddings_round_trip():
    saved = {"test": np.eye(3, dtype=np.float32), "test_labels": np.arange(3), "ks": np.array([1, 2])}
    back = read_embeddings(embeddings_bytes(saved))
    assert back.keys() == saved.keys()
    for name, array in saved.items():
        np.testing.assert_array_equal(back[name], array)
        assert back[name].dtype == array.dtype


def test_the_vocabulary_needs_no_torch_ray_or_mlflow():
    import subprocess

    code = "import sys, study.vocab; print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
