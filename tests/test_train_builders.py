"""The builders of ``python -m dcal.train`` are registries: model and data names, the kind of data
each model trains on, and every error message that lists choices come from the tables
(``dcal.train.build.MODEL_BUILDERS``, ``DATA_BUILDERS``), so a new entry is listed everywhere."""

from __future__ import annotations

import dataclasses

import pytest

from dcal.train import build as B
from dcal.train.config import Config, TrainConfig


def _cfg(model, data):
    return Config(model=dict(model), data=dict(data), train=TrainConfig())


def test_every_entry_names_a_known_kind():
    assert set(B.KINDS) == {b.kind for b in B.DATA_BUILDERS.values()}
    assert {b.data for b in B.MODEL_BUILDERS.values()} <= set(B.KINDS)
    for kind in B.KINDS:  # every kind of data has a model that trains on it
        assert any(b.data == kind for b in B.MODEL_BUILDERS.values()), kind


def test_unknown_names_list_the_whole_table(monkeypatch):
    with pytest.raises(ValueError) as e:
        B.model_builder("resnet")
    assert all(name in str(e.value) for name in B.MODEL_BUILDERS)
    with pytest.raises(ValueError) as e:
        B.data_builder("imagenet")
    assert all(name in str(e.value) for name in B.DATA_BUILDERS)

    # the messages are made from the tables: a new entry is listed at once
    monkeypatch.setitem(B.MODEL_BUILDERS, "zz_model", B.ModelBuilder(B._build_mlp))
    monkeypatch.setitem(B.DATA_BUILDERS, "zz_data", dataclasses.replace(B.DATA_BUILDERS["synthetic"]))
    with pytest.raises(ValueError, match="zz_model"):
        B.model_builder("resnet")
    with pytest.raises(ValueError, match="zz_data"):
        B.data_builder("imagenet")


@pytest.mark.parametrize("model", sorted(B.MODEL_BUILDERS))
def test_pairing_follows_the_kinds(model):
    want = B.MODEL_BUILDERS[model].data
    for data, entry in B.DATA_BUILDERS.items():
        if entry.kind == want:
            B._check_pairing(model, data)
            continue
        with pytest.raises(ValueError) as e:
            B._check_pairing(model, data)
        msg = str(e.value)
        assert msg.startswith(f"model.name {model!r} does not train on data.name {data!r}")
        fits = [d for d, b in B.DATA_BUILDERS.items() if b.kind == want]
        assert all(d in msg for d in fits), msg


def test_a_mismatched_pair_is_refused_before_any_data_is_built(monkeypatch):
    def must_not_run(*a, **k):
        raise AssertionError("data built for a model that cannot train on it")

    entry = dataclasses.replace(B.DATA_BUILDERS["synthetic"], build=must_not_run)
    monkeypatch.setitem(B.DATA_BUILDERS, "synthetic", entry)
    with pytest.raises(ValueError, match="synthetic_captions"):
        B.build_task(_cfg({"name": "clip"}, {"name": "synthetic"}))
    with pytest.raises(ValueError, match="bev_synthetic"):
        B.build_task(_cfg({"name": "bev"}, {"name": "synthetic"}))
    with pytest.raises(ValueError, match="unknown data.name 'nope'"):
        B.build_task(_cfg({"name": "mlp"}, {"name": "nope"}))
    # a model key the model does not take: named before the data is read, whatever the data
    with pytest.raises(ValueError, match="unknown key model.hiden"):
        B.build_task(_cfg({"name": "mlp", "hiden": 3}, {"name": "synthetic"}))
    with pytest.raises(ValueError, match="unknown key model.hidden"):
        B.build_task(_cfg({"name": "bev", "hidden": 3}, {"name": "synthetic"}))


def test_model_keys_come_from_the_entry():
    for name, entry in B.MODEL_BUILDERS.items():
        if entry.keys is not None:
            keys = entry.keys()
            assert keys and all(isinstance(k, str) for k in keys), name
    assert B.MODEL_BUILDERS["mlp"].keys() == {"hidden": 64, "num_classes": None}
    assert set(B.PROTONET_LOSS_KEYS) <= set(B.MODEL_BUILDERS["protonet"].keys())


def test_data_keys_and_defaults_come_from_the_entry():
    with pytest.raises(ValueError, match="img_sise"):
        B.build_data({"name": "synthetic", "img_sise": 3}, seed=0)
    train, val, facts = B.build_data(
        {"name": "synthetic", "img_size": 16, "num_classes": 3, "train_size": 6, "val_size": 3}, seed=0
    )
    assert (len(train), len(val)) == (6, 3)
    assert facts["num_classes"] == 3 and facts["in_shape"] == (3, 16, 16)
    # defaults are copied per build: a builder cannot change the table's
    keys = B.DATA_BUILDERS["bev_synthetic"].keys
    assert keys["map_size"] == [32, 32]
    B.build_data({"name": "bev_synthetic", "map_size": [8, 8], "train_size": 2, "val_size": 2}, seed=0)
    assert keys["map_size"] == [32, 32]


def test_resume_reads_model_defaults_from_the_table():
    """A model key written out at its default is no change on --resume, for every model whose
    entry declares its keys; another value is refused (it changes the model)."""
    from dcal.train.rundir import compare_configs

    data = {"name": "synthetic"}
    for name, key, default, other in (("mlp", "hidden", 64, 32), ("bev", "channels", 64, 32)):
        assert B.MODEL_BUILDERS[name].keys()[key] == default
        saved = {"model": {"name": name}, "data": data, "train": {}}
        same = {"model": {"name": name, key: default}, "data": data, "train": {}}
        assert compare_configs(saved, same) == ([], [])
        refused, _ = compare_configs(saved, {"model": {"name": name, key: other}, "data": data, "train": {}})
        assert refused == [f"model.{key}: {default} -> {other}"]


def test_fsdp_choices_have_one_home():
    """The FSDP choices are config.py's tuples; distributed.py reads them (no second copy), and
    the refusal lists every choice."""
    import torch

    from dcal.train import config as C
    from dcal.train import distributed as DI

    assert DI.CHECKPOINTING is C.CHECKPOINTING
    assert tuple(DI.PARAM_DTYPES) == C.FSDP_PARAM_DTYPES and DI.PARAM_DTYPES["bf16"] is torch.bfloat16
    with pytest.raises(ValueError, match=r"train.fsdp_param_dtype must be null or 'bf16', got 'fp16'"):
        TrainConfig(fsdp_param_dtype="fp16").validate()
