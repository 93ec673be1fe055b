"""Sharded model directories in the Hugging Face layout."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import tensorkeep as tk
from tensorkeep.layouts.sharded import parse_size, plan_shards


def _sd(n=6):
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(64, 64, generator=g) for i in range(n)}


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(7) == 7
    with pytest.raises(ValueError, match="2GB"):
        parse_size("lots")


def test_plan_shards_respects_limit():
    sd = _sd(5)  # 16 KiB each
    plan = plan_shards(sd, 40_000)
    assert plan == [["layer0.weight", "layer1.weight"], ["layer2.weight", "layer3.weight"], ["layer4.weight"]]
    assert plan_shards({"big": torch.zeros(10_000)}, 100) == [["big"]]


def test_round_trip_layout_readable_by_safetensors(tmp):
    sd = _sd()
    d = os.path.join(tmp, "model")
    files = tk.save_sharded(sd, d, max_shard_size="40KB")
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    assert index["metadata"]["total_size"] == 6 * 64 * 64 * 4
    assert set(index["weight_map"]) == set(sd)
    for f in files:  # every shard is a plain safetensors file too
        for k, v in load_file(os.path.join(d, f)).items():
            assert torch.equal(v, sd[k]) and index["weight_map"][k] == f
    back = tk.load(d)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_single_shard_is_model_safetensors(tmp):
    d = os.path.join(tmp, "small")
    assert tk.save_sharded(_sd(2), d) == ["model.safetensors"]
    assert set(tk.load(d)) == {"layer0.weight", "layer1.weight"}


def test_reads_directory_written_by_others(tmp):
    sd = _sd(4)
    d = os.path.join(tmp, "hf")
    os.makedirs(d)
    save_file({k: sd[k] for k in list(sd)[:2]}, os.path.join(d, "model-00001-of-00002.safetensors"), {"format": "pt"})
    save_file({k: sd[k] for k in list(sd)[2:]}, os.path.join(d, "model-00002-of-00002.safetensors"), {"format": "pt"})
    wm = {k: f"model-0000{1 + i // 2}-of-00002.safetensors" for i, k in enumerate(sd)}
    json.dump(
        {"metadata": {"total_size": 1}, "weight_map": wm}, open(os.path.join(d, "model.safetensors.index.json"), "w")
    )
    back = tk.load(d)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    m = torch.nn.Module()
    for i in range(4):
        m.register_module(f"layer{i}", torch.nn.Linear(64, 64, bias=False))
    assert tk.load_into(m, d).ok and torch.equal(m.layer3.weight, sd["layer3.weight"])


def test_replacing_a_directory_is_atomic_and_clean(tmp):
    d = os.path.join(tmp, "model")
    tk.save_sharded(_sd(6), d, max_shard_size="40KB")
    tk.save_sharded(_sd(2), d, max_shard_size="40KB")
    assert sorted(os.listdir(d)) == ["model.safetensors"]
    assert [f for f in os.listdir(tmp) if "tk-tmp" in f] == []


def test_bad_index_refused(tmp):
    d = os.path.join(tmp, "bad")
    tk.save_sharded(_sd(4), d, max_shard_size="40KB")
    idx = os.path.join(d, "model.safetensors.index.json")
    json.dump({"weight_map": {"layer0.weight": "../../etc/passwd"}}, open(idx, "w"))
    with pytest.raises(tk.FormatError, match="plain file name"):
        tk.load(d)
    json.dump({"weight_map": {"layer0.weight": "model-00009-of-00009.safetensors"}}, open(idx, "w"))
    with pytest.raises(tk.FormatError, match="missing"):
        tk.load(d)
    json.dump({"weight_map": {"nope": "model-00001-of-00002.safetensors"}}, open(idx, "w"))
    with pytest.raises(tk.FormatError, match="lacks it"):
        tk.load(d)
    open(idx, "w").write('{"weight_map": {"a": "x", "a": "y"}}')
    with pytest.raises(tk.FormatError, match="duplicate"):
        tk.load(d)


def test_not_a_model_directory(tmp):
    with pytest.raises(tk.FormatError, match="not a model directory"):
        tk.load(tmp)


def test_single_file_directory_leaves_no_open_files(tmp):
    d = os.path.join(tmp, "single")
    tk.save_sharded(_sd(2), d)
    fds = lambda: len(os.listdir("/proc/self/fd"))
    before = fds()
    for _ in range(3):
        assert set(tk.load(d)) == {"layer0.weight", "layer1.weight"}
    assert fds() == before
