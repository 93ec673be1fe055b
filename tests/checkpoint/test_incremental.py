"""Incremental checkpoints (``CheckpointManager(..., incremental=True)``): unchanged tensors are
stored once, by content hash, in packs the run shares; retention never deletes a pack a kept
checkpoint needs, even when cleanup is interrupted."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

import tensorkeep as tk
from tensorkeep.checkpoint import layout, packs
from tensorkeep.core.format import seal
from tensorkeep.storage import local as _io


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Embedding(500, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    for p in list(net[0].parameters()) + list(net[1].parameters()):
        p.requires_grad_(False)  # a frozen backbone: ~90% of the parameters
    return net


def _train(net: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 1) -> None:
    for _ in range(steps):
        x = torch.randint(0, 500, (16,))
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _copy(sd: dict) -> dict:
    return {k: v.clone() for k, v in sd.items()}


def _pack_keys(run: str) -> dict[str, set[str]]:
    out = {}
    for p in sorted(os.listdir(packs.packs_dir(run))):
        with tk.open(os.path.join(packs.packs_dir(run), p)) as f:
            out[p] = set(f.keys())
    return out


def test_frozen_tensors_are_written_once_and_every_step_restores_exactly(tmp):
    net = _net()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    saved = {}
    with tk.CheckpointManager(tmp, incremental=True) as mgr:
        for step in range(1, 5):
            _train(net, opt)
            mgr.save(step, {"model": net, "optimizer": opt, "arr": np.arange(3) * step, "note": f"s{step}"})
            saved[step] = (
                _copy(net.state_dict()),
                _copy({k: v["momentum_buffer"] for k, v in opt.state_dict()["state"].items()}),
            )
        infos = {c.step: c for c in tk.list_checkpoints(tmp)}
    frozen = net[0].weight.numel() * 4 + net[1].weight.numel() * 4 + net[1].bias.numel() * 4
    first, later = infos[1], infos[3]
    assert first.bytes_written >= frozen
    assert later.bytes_written < frozen / 4, (first.bytes_written, later.bytes_written)
    assert later.bytes_held == first.bytes_held  # the same state, held in full
    # the frozen embedding sits in step 1's pack and in no other
    keys = _pack_keys(tmp)
    m = layout.read_manifest(layout.step_dir(tmp, 4))
    h_emb, pack_emb = m.parts["model.tk"]["tensors"]["0.weight"]
    assert pack_emb.startswith("00000001-") and [p for p, k in keys.items() if h_emb in k] == [pack_emb]

    for step in (4, 2, 1):
        net2 = _net(seed=9)
        opt2 = torch.optim.SGD([p for p in net2.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        state = {"model": net2, "optimizer": opt2, "arr": None, "note": None}
        with tk.CheckpointManager(tmp) as mgr:  # a plain manager reads incremental checkpoints too
            assert mgr.restore(state, step=step) == step
        want_sd, want_mom = saved[step]
        assert all(torch.equal(want_sd[k], v) for k, v in net2.state_dict().items())
        got_mom = {k: v["momentum_buffer"] for k, v in opt2.state_dict()["state"].items()}
        assert all(torch.equal(want_mom[k], got_mom[k]) for k in want_mom)
        assert isinstance(state["arr"], np.ndarray) and state["arr"].tolist() == [0, step, 2 * step]
        assert state["note"] == f"s{step}"


def test_identical_tensors_are_stored_once_but_restored_as_separate_tensors(tmp):
    z1, z2 = torch.zeros(1000), torch.zeros(1000)
    with tk.CheckpointManager(tmp, incremental=True) as mgr:
        mgr.save(1, {"a": z1, "b": z2, "tied": [z1, z1]})
    (pack,) = _pack_keys(tmp).values()
    assert len([k for k in pack]) <= 4  # the zeros once, plus the RNG states
    state = {"a": torch.ones(1000), "b": torch.ones(1000), "tied": None}
    with tk.CheckpointManager(tmp) as mgr:
        mgr.restore(state)
    assert torch.equal(state["a"], z1) and torch.equal(state["b"], z2)
    state["a"].add_(1)
    assert state["b"].sum() == 0  # no aliasing between equal-valued tensors
    x, y = state["tied"]
    assert x is y  # the same tensor twice stays one object


def test_retention_keeps_every_pack_a_kept_checkpoint_needs(tmp):
    net = _net()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    with tk.CheckpointManager(tmp, keep_last=2, incremental=True) as mgr:
        for step in range(1, 7):
            _train(net, opt)
            mgr.save(step, {"model": net})
        assert mgr.steps() == [5, 6]
    names = sorted(os.listdir(packs.packs_dir(tmp)))
    # step 1's pack holds the frozen layers both kept checkpoints use; steps 2-4 wrote packs nobody needs now
    assert [n[:8] for n in names] == ["00000001", "00000005", "00000006"]
    for step in (5, 6):
        with tk.CheckpointManager(tmp) as mgr:
            assert mgr.restore({"model": _net(3)}, step=step) == step


def test_pruning_away_everything_but_the_newest_still_restores(tmp):
    with tk.CheckpointManager(tmp, incremental=True) as mgr:
        for step in range(1, 4):
            mgr.save(step, {"frozen": torch.arange(5000.0), "w": torch.full((10,), float(step))})
        assert mgr.prune([tk.LatestN(1)]) == [1, 2]
    state = {"frozen": torch.zeros(5000), "w": torch.zeros(10)}
    with tk.CheckpointManager(tmp) as mgr:
        assert mgr.restore(state) == 3
    assert torch.equal(state["frozen"], torch.arange(5000.0)) and state["w"][0] == 3


@pytest.mark.parametrize("fail_at", range(0, 12))
def test_cleanup_interrupted_at_any_deletion_never_loses_a_kept_checkpoint(tmp, monkeypatch, fail_at):
    """Each deletion of retention (manifest, checkpoint directory, pack) in turn raises, as if the
    process died there; a new manager then restores every kept step exactly and removes the garbage."""
    with tk.CheckpointManager(tmp, incremental=True) as mgr:
        for step in range(1, 5):
            mgr.save(step, {"frozen": torch.arange(5000.0), "w": torch.full((100,), float(step))})
    calls = {"n": 0}

    def dying(real):
        def f(*a, **k):
            calls["n"] += 1
            if calls["n"] > fail_at:
                raise KeyboardInterrupt("simulated crash during cleanup")
            return real(*a, **k)

        return f

    for name in ("unlink", "rename", "rmdir"):  # the primitives (unlink_if_exists calls unlink)
        monkeypatch.setattr(_io, name, dying(getattr(_io, name)))
    mgr = tk.CheckpointManager(tmp, incremental=True)
    try:
        mgr.prune([tk.LatestN(1)])
        finished = True
    except KeyboardInterrupt:
        finished = False
    finally:
        monkeypatch.undo()
        mgr.close()
    assert finished == (fail_at == 11)  # 3 steps (renamed away, manifest, directory), 2 packs: 11 deletions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # leftovers of the interrupted cleanup are reported
        mgr = tk.CheckpointManager(tmp)
    with mgr:
        assert 4 in mgr.steps()
        for step in mgr.steps():
            state = {"frozen": torch.zeros(5000), "w": torch.zeros(100)}
            assert mgr.restore(state, step=step) == step
            assert torch.equal(state["frozen"], torch.arange(5000.0)) and state["w"][0] == step
        needed = {p for m in packs.committed(tmp) for p in m.packs}
    assert set(os.listdir(packs.packs_dir(tmp))) == needed  # the new manager removed the rest


def test_async_incremental_hashes_in_the_background(tmp):
    net = _net()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    with tk.CheckpointManager(tmp, incremental=True, async_save=True, keep_last=2) as mgr:
        for step in range(1, 4):
            _train(net, opt)
            mgr.save(step, {"model": net})
        mgr.wait()
        want = _copy(net.state_dict())
        infos = {c.step: c for c in tk.list_checkpoints(tmp)}
    assert infos[3].bytes_written < infos[3].bytes_held / 4
    net2 = _net(5)
    with tk.CheckpointManager(tmp) as mgr:
        assert mgr.restore({"model": net2}) == 3
    assert all(torch.equal(want[k], v) for k, v in net2.state_dict().items())


def test_a_damaged_pack_makes_restore_fall_back_and_verify_fail(tmp):
    with tk.CheckpointManager(tmp, incremental=True) as mgr:
        mgr.save(1, {"w": torch.full((5000,), 1.0)})
        mgr.save(2, {"w": torch.full((5000,), 2.0)})
    newest = max(os.listdir(packs.packs_dir(tmp)))
    p = os.path.join(packs.packs_dir(tmp), newest)
    with open(p, "r+b") as f:
        f.seek(os.path.getsize(p) - 100)
        f.write(b"\xff" * 4)
    state = {"w": torch.zeros(5000)}
    with tk.CheckpointManager(tmp) as mgr, pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert mgr.restore(state) == 1
    assert state["w"][0] == 1
    status = {c.step: c.status for c in tk.list_checkpoints(tmp, verify=True)}
    assert status[1] == "ok" and status[2].startswith("damaged") and newest in status[2]
    os.unlink(p)
    status = {c.step: c.status for c in tk.list_checkpoints(tmp)}
    assert "missing" in status[2]


def test_an_unreadable_manifest_stops_pack_cleanup(tmp):
    with tk.CheckpointManager(tmp, incremental=True) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": torch.full((100,), float(step))})
    with open(os.path.join(layout.step_dir(tmp, 1), layout.MANIFEST), "w") as f:
        f.write("{garbage")
    before = sorted(os.listdir(packs.packs_dir(tmp)))
    junk = os.path.join(packs.packs_dir(tmp), "00000009-deadbeef.tk")
    open(junk, "wb").close()
    with tk.CheckpointManager(tmp, keep_last=1) as mgr:
        mgr.save(3, {"w": torch.full((100,), 3.0)})
    # nobody can tell what the damaged step 1 refers to, so no pack is deleted
    assert set(before) | {os.path.basename(junk)} <= set(os.listdir(packs.packs_dir(tmp)))


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["packs"].clear(),
        lambda d: d["parts"]["values.tk"]["tensors"].update(w=["00" * 32]),
        lambda d: d["parts"]["values.tk"]["tensors"].update(w=["zz" * 32, next(iter(d["packs"]))]),
        lambda d: d["packs"].update({"../../etc/passwd": {"size": 1, "crc32": "0"}}),
        lambda d: d["parts"]["values.tk"].pop("key"),
        lambda d: d.update(parts=[]),
    ],
)
def test_a_malformed_incremental_manifest_is_refused(tmp, edit):
    with tk.CheckpointManager(tmp, incremental=True) as mgr:
        mgr.save(1, {"w": torch.ones(10)})
    mp = os.path.join(layout.step_dir(tmp, 1), layout.MANIFEST)
    d = json.load(open(mp))
    edit(d)
    with open(mp, "w") as f:
        json.dump(d, f)
    with pytest.raises(tk.FormatError):
        layout.read_manifest(layout.step_dir(tmp, 1))
    with tk.CheckpointManager(tmp) as mgr, pytest.warns(UserWarning, match="skipping damaged"):
        assert mgr.restore({"w": torch.zeros(10)}) is None


def test_a_manifest_that_names_a_missing_tensor_is_refused_at_restore(tmp):
    with tk.CheckpointManager(tmp, incremental=True) as mgr:
        mgr.save(1, {"w": torch.ones(10)})
    mp = os.path.join(layout.step_dir(tmp, 1), layout.MANIFEST)
    d = json.load(open(mp))
    d.pop("crc32")
    ref = d["parts"]["values.tk"]["tensors"]["w"]
    ref[0] = "ab" * 32  # a well-formed hash the pack does not hold (forged: the checksum is made to match)
    with open(mp, "wb") as f:
        f.write(seal(json.dumps(d, separators=(",", ":"))))
    with tk.CheckpointManager(tmp) as mgr, pytest.raises(tk.CheckpointNotFoundError, match="does not hold it"):
        mgr.restore({"w": torch.zeros(10)}, step=1)


def test_ls_shows_bytes_written_and_held(tmp):
    import subprocess
    import sys

    with tk.CheckpointManager(tmp, incremental=True) as mgr:
        mgr.save(1, {"frozen": torch.zeros(100_000), "w": torch.ones(10)})
        mgr.save(2, {"frozen": torch.zeros(100_000), "w": torch.ones(10) * 2})
    out = subprocess.run([sys.executable, "-m", "tensorkeep.cli", "ls", tmp, "--json"], capture_output=True, text=True)
    rows = {r["step"]: r for r in json.loads(out.stdout)}
    assert rows[1]["bytes_held"] == rows[2]["bytes_held"] >= 400_000
    assert rows[2]["bytes_written"] < 100_000 < rows[1]["bytes_written"]
