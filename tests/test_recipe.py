"""Recipes: every shipped recipe loads; bad input is a one-line TensorpressError before any work."""
from dataclasses import dataclass

import pytest

from conftest import make_tiny
from tensorpress.compress import base as cbase
from tensorpress.compress.apply import plan
from tensorpress.errors import TensorpressError
from tensorpress.recipe import Recipe, available_recipes


def test_shipped_recipes_load():
    shipped = available_recipes()
    for name in ("gptq-w4g64", "rtn-w4g64", "svd-p80", "svdllm-p80", "gptq-w3g64"):
        assert name in shipped
    for name, path in shipped.items():
        r = Recipe.load(name)
        assert r.description and r.stages, name


@pytest.mark.parametrize("recipe,match", [
    ({"stages": [{"method": "nope"}]}, "unknown method 'nope'"),
    ({"stages": [{"method": "rtn", "bitz": 4}]}, "unknown parameter"),
    ({"stages": [{"method": "rtn", "bits": 9}]}, "bits"),
    ({"stages": [{"method": "rtn", "bits": "four"}]}, "bits"),
    ({"stages": [{"method": "gptq", "damp": -1}]}, "damp"),
    ({"stages": [{"method": "svd"}]}, "exactly one of"),
    ({"stages": [{"method": "svd", "ratio": 1.5}]}, "ratio"),
    ({"stages": []}, "non-empty"),
    ({"stages": [{"method": "rtn", "targets": "("}]}, "bad regex"),
    ({"stages": [{"method": "rtn"}], "calibration": {"samples": 0}}, "samples"),
    ({"stages": [{"method": "rtn"}], "extra": 1}, "unknown key"),
    ([1, 2], "mapping"),
])
def test_bad_recipes(recipe, match):
    with pytest.raises(TensorpressError, match=match):
        Recipe.from_dict(recipe)


def test_layer_checks_happen_before_work():
    model = make_tiny("llama")     # hidden 64, intermediate 96
    with pytest.raises(TensorpressError, match="group_size 128 cannot apply"):
        plan(model, Recipe.from_dict({"stages": [{"method": "rtn", "group_size": 128}]}))
    with pytest.raises(TensorpressError, match="above min"):
        plan(model, Recipe.from_dict({"stages": [{"method": "svd", "rank": 65}]}))
    with pytest.raises(TensorpressError, match="matches no linear"):
        plan(model, Recipe.from_dict({"stages": [{"method": "rtn", "group_size": 32, "targets": "nothing"}]}))


def test_correction_needs_a_base(monkeypatch):
    @dataclass
    class P:
        rank: int = 4

    class Corr(cbase.Compressor):
        name, role, Params = "test-correction", "correction", P

    monkeypatch.setitem(cbase.REGISTRY, "test-correction", Corr)
    r = Recipe.from_dict({"stages": [{"method": "test-correction"}]})
    with pytest.raises(TensorpressError, match="no compressed base"):
        plan(make_tiny("llama"), r)
    ok = Recipe.from_dict({"stages": [{"method": "rtn", "group_size": 32}, {"method": "test-correction"}]})
    assert all(len(v) == 2 for v in plan(make_tiny("llama"), ok).values())


def test_load_errors(tmp_path):
    with pytest.raises(TensorpressError, match="unknown recipe"):
        Recipe.load("no-such-recipe")
    bad = tmp_path / "r.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(TensorpressError, match="not valid YAML"):
        Recipe.load(bad)
