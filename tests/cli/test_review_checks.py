"""Fixes from the second adversarial review of issue 14: checks that really check.

- an incremental save refers to a committed pack only after checking it (a damaged or missing
  pack is treated as absent: its tensors are written again, with a warning naming it);
- ``async_save="lazy"`` and parameters changed through ``.data``;
- ``tensorkeep verify`` on what it cannot read: a model file that is a dangling symlink or a
  directory, a DCP directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
import warnings

import pytest
import torch

import tensorkeep as tk
from tensorkeep import inspection
from tensorkeep.checkpoint import packs
from tensorkeep.storage import backend


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(64, 64)


def _flip(path: str, at: int = -5) -> None:
    """Flip one bit of a file in place (bit rot in a tensor's bytes)."""
    with open(path, "r+b") as f:
        f.seek(at, os.SEEK_END if at < 0 else os.SEEK_SET)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))


def _only_pack(run: str) -> str:
    (name,) = os.listdir(packs.packs_dir(run))
    return os.path.join(packs.packs_dir(run), name)


def _restores_exactly(run: str, net: torch.nn.Module, step: int) -> None:
    fresh = torch.nn.Linear(64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no checkpoint may be skipped as damaged
        with tk.CheckpointManager(run, incremental=True) as mgr:
            assert mgr.restore({"model": fresh}) == step
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))
    assert all(c.status == "ok" for c in tk.list_checkpoints(run, verify=True))


# ------------------------------------------------------------------ incremental: reuse only checked packs


@pytest.mark.parametrize("damage", ["bit rot", "deleted", "truncated", "a directory"])
def test_a_damaged_or_missing_pack_is_not_reused(tmp, damage):
    run, net = os.path.join(tmp, "run"), _net()
    with tk.CheckpointManager(run, keep_last=2, incremental=True) as mgr:
        mgr.save(1, {"model": net})
    pack = _only_pack(run)
    if damage == "bit rot":
        _flip(pack)
    elif damage == "deleted":
        os.unlink(pack)
    elif damage == "truncated":
        os.truncate(pack, os.path.getsize(pack) - 1)
    else:
        os.unlink(pack)
        os.mkdir(pack)
    with tk.CheckpointManager(run, keep_last=2, incremental=True) as mgr:
        with pytest.warns(UserWarning, match=f"{os.path.basename(pack)} is not reused"):
            mgr.save(2, {"model": net})
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # written once, fresh: the next saves reuse the new pack silently
            mgr.save(3, {"model": net})
            mgr.save(4, {"model": net})
        assert mgr.steps() == [3, 4]
    _restores_exactly(run, net, 4)


def test_a_pack_replaced_after_it_was_verified_is_checked_again(tmp):
    run, net = os.path.join(tmp, "run"), _net()
    with tk.CheckpointManager(run, incremental=True) as mgr:
        mgr.save(1, {"model": net})
        mgr.save(2, {"model": net})  # reuses (and verifies) the first pack
        pack = _only_pack(run)
        shutil.copy(pack, pack + ".new")  # same header, same size, one tensor bit flipped: a restored backup gone bad
        _flip(pack + ".new")
        os.replace(pack + ".new", pack)
        with pytest.warns(UserWarning, match="is damaged"):
            mgr.save(3, {"model": net})
    fresh = torch.nn.Linear(64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with tk.CheckpointManager(run, incremental=True) as mgr:
            assert mgr.restore({"model": fresh}) == 3
    assert torch.equal(fresh.weight, net.weight)
    assert [c.status == "ok" for c in tk.list_checkpoints(run, verify=True)] == [False, False, True]


def test_reused_tensors_are_read_once_per_process(tmp, monkeypatch):
    """Verifying what a save reuses costs one read per pack and process, not one per save; and none
    after restore(), which verified the same tensors."""
    opened = []
    real = packs.open_reader
    monkeypatch.setattr(packs, "open_reader", lambda path: opened.append(path) or real(path))
    run, net = os.path.join(tmp, "run"), _net()
    with tk.CheckpointManager(run, incremental=True) as mgr:
        for step in range(1, 5):
            mgr.save(step, {"model": net})
    assert len(opened) == 1  # save 2 verified the tensors it reused from save 1's pack; saves 3, 4 did not read
    opened.clear()
    packs._verified.clear()  # as in a new process
    with tk.CheckpointManager(run, incremental=True) as mgr:
        assert mgr.restore({"model": torch.nn.Linear(64, 64)}) == 4
        mgr.save(5, {"model": net})
    assert opened == []


@pytest.mark.parametrize("damage", ["bit rot", "deleted"])
def test_object_storage_does_not_reuse_a_damaged_or_missing_pack(damage):
    run, net = f"memory://tk-tests/{uuid.uuid4().hex[:8]}", _net()
    with tk.CheckpointManager(run, keep_last=2, incremental=True) as mgr:
        mgr.save(1, {"model": net})
    store = backend(run)
    (key,) = store.list("packs/")
    if damage == "deleted":
        store.delete([key])
    else:
        data = bytearray(store.read(key))
        data[-5] ^= 1
        store.write(key, [bytes(data)], len(data))
    with tk.CheckpointManager(run, keep_last=2, incremental=True) as mgr:
        with pytest.warns(UserWarning, match=f"{key} is not reused"):
            mgr.save(2, {"model": net})
        mgr.save(3, {"model": net})
    fresh = torch.nn.Linear(64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with tk.CheckpointManager(run, incremental=True) as mgr:
            assert mgr.restore({"model": fresh}) == 3
    assert torch.equal(fresh.weight, net.weight)


# ------------------------------------------------------------------ verify: what it cannot read is not OK

EXE = os.path.join(os.path.dirname(sys.executable), "tensorkeep")


def _cli_verify(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, "verify", path], capture_output=True, text=True, timeout=120)  # a hang fails


def _model_dir(tmp: str, name: str) -> str:
    d = os.path.join(tmp, name)
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write("{}")
    return d


@pytest.mark.parametrize("what", ["dangling symlink", "directory", "fifo"])
def test_verify_a_model_file_that_is_not_a_file_is_damage(tmp, what):
    d = _model_dir(tmp, "hf")
    single = os.path.join(d, "model.safetensors")
    if what == "dangling symlink":  # a Hugging Face cache whose blob is missing
        os.symlink(os.path.join(tmp, "blobs", "missing"), single)
    elif what == "directory":
        os.mkdir(single)
    else:
        os.mkfifo(single)
    res = inspection.verify(d)
    assert not res.ok and [p.path for p in res.problems] == [single]
    if what == "dangling symlink":  # the command (one run: each starts torch)
        r = _cli_verify(d)
        assert r.returncode == 1 and "DAMAGED" in r.stdout and "does not exist" in r.stdout, r.stdout


def test_verify_a_dangling_model_file_next_to_an_index_or_a_dangling_shard(tmp):
    d = os.path.join(tmp, "sharded")
    tk.save_sharded({"a": torch.ones(300), "b": torch.zeros(300)}, d, max_shard_size=1000)
    shards = sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))
    assert len(shards) == 2 and inspection.verify(d).ok
    os.symlink(os.path.join(tmp, "missing"), os.path.join(d, "model.safetensors"))
    assert [p.path for p in inspection.verify(d).problems] == [os.path.join(d, "model.safetensors")]
    os.unlink(os.path.join(d, "model.safetensors"))
    os.replace(os.path.join(d, shards[0]), os.path.join(tmp, "moved"))
    os.symlink(os.path.join(tmp, "gone"), os.path.join(d, shards[0]))
    res = inspection.verify(d)
    assert [p.path for p in res.problems] == [os.path.join(d, shards[0])] and "does not exist" in res.problems[0].what


def test_verify_a_fifo_given_by_name_is_damage_not_a_hang(tmp):
    os.mkfifo(os.path.join(tmp, "x.tk"))
    r = _cli_verify(os.path.join(tmp, "x.tk"))
    assert r.returncode == 1 and "not a regular file" in r.stdout


def _dcp_dir(tmp: str) -> str:
    import torch.distributed.checkpoint as dcp

    d = os.path.join(tmp, "dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming a single process"
        dcp.save({"w": torch.arange(64.0), "step": 3}, checkpoint_id=d)
    return d


def test_verify_reads_a_dcp_directory_as_convert_does(tmp):
    d = _dcp_dir(tmp)
    res = inspection.verify(d)
    assert res.ok and res.checked_files >= 2 and os.path.join(d, ".metadata") in res.files
    name = next(n for n in os.listdir(d) if n.endswith(".distcp"))
    raw = open(os.path.join(d, name), "rb").read()
    at = raw.index(torch.arange(64.0).numpy().tobytes())
    with open(os.path.join(d, name), "r+b") as f:  # one bit of the tensor's bytes
        f.seek(at + 100)
        f.write(bytes([raw[at + 100] ^ 1]))
    with pytest.raises(tk.ChecksumError):
        tk.convert_dcp(d, os.path.join(tmp, "out.tk"))
    res = inspection.verify(d)
    assert not res.ok and "CRC-32" in res.problems[0].what
    assert [p.path for p in inspection.verify(tmp).problems] == [d]  # found inside a tree too


def test_verify_a_dcp_directory_with_a_missing_data_file_or_a_fifo_metadata(tmp):
    d = _dcp_dir(tmp)
    for n in os.listdir(d):
        if n.endswith(".distcp"):
            os.unlink(os.path.join(d, n))
    assert not inspection.verify(d).ok  # .metadata alone: recognised by its contents
    os.unlink(os.path.join(d, ".metadata"))
    os.mkfifo(os.path.join(d, ".metadata"))  # convert_dcp would block opening it
    res = inspection.verify(d)
    assert [p.path for p in res.problems] == [os.path.join(d, ".metadata")] and "not a regular" in res.problems[0].what


def test_verify_a_foreign_metadata_folder_is_not_a_dcp_checkpoint(tmp):
    os.makedirs(os.path.join(tmp, "ws", ".metadata"))  # an Eclipse workspace
    with open(os.path.join(tmp, "ws", ".metadata", "version.ini"), "w") as f:
        f.write("x")
    res = inspection.verify(os.path.join(tmp, "ws"))
    assert res.ok and any("nothing verified" in n for n in res.notes)
