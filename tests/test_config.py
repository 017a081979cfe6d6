"""MoAConfig validation: every bad field gets a message naming it."""
import json

import pytest

import moa
from moa.tiny import tiny_model


@pytest.mark.parametrize("kwargs,match", [
    (dict(cultures=[]), "cultures must not be empty"),
    (dict(cultures=["japan", "india", "japan"]), r"repeated: \['japan'\]"),
    (dict(cultures=["japan", ""]), "non-empty string"),
    (dict(cultures="japan"), "list of names"),
    (dict(cultures=["a"], r=0), "r must be a positive integer, got 0"),
    (dict(cultures=["a"], alpha=-1), "alpha must be a positive number"),
    (dict(cultures=["a"], target_modules=[]), "target_modules"),
    (dict(cultures=["a"], train_routing="teacher"), "train_routing must be one of"),
    (dict(cultures=["a", "b"], top_k=3), "top_k must be an integer in 1..2"),
    (dict(cultures=["a"], dropout=1.5), "dropout"),
])
def test_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moa.MoAConfig(**kwargs)


@pytest.mark.parametrize("name", ["base", "auto"])
def test_serve_model_ids_are_not_culture_names(name):
    with pytest.raises(ValueError, match=f"culture name '{name}' is reserved: 'auto' \\(the router's pick\\) and 'base'"):
        moa.MoAConfig(cultures=["japan", name])


def test_scaling_and_rslora():
    assert moa.MoAConfig(cultures=["a"], r=16, alpha=32).scaling == 2.0
    assert moa.MoAConfig(cultures=["a"], r=16, alpha=32, rslora=True).scaling == 8.0


def test_file_roundtrip_and_unknown_keys(tmp_path):
    cfg = moa.MoAConfig(cultures=["japan", "nigeria"], r=8)
    cfg.save(tmp_path / "c.json")
    assert moa.MoAConfig.from_file(tmp_path / "c.json") == cfg
    (tmp_path / "c.yaml").write_text("cultures: [japan]\nrank: 8\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown key 'rank'; known keys: \['alpha', 'cultures', "):
        moa.MoAConfig.from_file(tmp_path / "c.yaml")
    (tmp_path / "d.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(ValueError, match=r"d.json: missing required key\(s\) \['cultures'\]"):
        moa.MoAConfig.from_file(tmp_path / "d.json")
    (tmp_path / "e.yaml").write_text("cultures: [japan]\nr: 8.0\nalpha: 16\ndropout: 5e-2\n")  # YAML 1.2 numbers, int -> float
    assert moa.MoAConfig.from_file(tmp_path / "e.yaml") == moa.MoAConfig(cultures=["japan"], r=8, alpha=16.0, dropout=0.05)
    (tmp_path / "f.yaml").write_text("cultures: [japan]\nrslora: 1\n")
    with pytest.raises(ValueError, match=r"f.yaml: rslora: expected bool, got 1"):
        moa.MoAConfig.from_file(tmp_path / "f.yaml")


def test_targets_matching_nothing():
    with pytest.raises(ValueError, match=r"target_modules \['qkv_proj'\] match no linear layer.*q_proj"):
        moa.MoAForCausalLM.from_base(tiny_model(), moa.MoAConfig(cultures=["a", "b"], target_modules=["q_proj", "qkv_proj"]))


def test_unknown_culture():
    cfg = moa.MoAConfig(cultures=["japan", "india"])
    with pytest.raises(ValueError, match="unknown culture 'france': expected one of"):
        cfg.culture_id("france")
    assert [cfg.culture_id(c) for c in ("india", 1, -1)] == [1, 1, -1]
    with pytest.raises(ValueError, match=r"culture id -1 out of range: expected 0..1 or a name of \['japan', 'india'\]"):
        cfg.culture_id(-1, base=False)
    with pytest.raises(ValueError, match=r"culture id 2 out of range: expected -1 \(base model\) or 0..1"):
        cfg.culture_id(2)
