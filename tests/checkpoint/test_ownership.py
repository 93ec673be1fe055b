"""tensorkeep never deletes or overwrites what it did not create, and never touches a path outside
the directory it was given.

A property test (hypothesis) fills a directory with arbitrary foreign files, directories and
symlinks (pointing inside and outside it, some named like tensorkeep's own files), runs every
operation that deletes or replaces, and checks that every foreign path is byte-identical
afterwards and that nothing outside was touched. --ownership-examples sets the example count.
"""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorkeep as tk
from support import sizes
from tensorkeep.checkpoint import layout, packs
from tensorkeep.cli import main as cli
from tensorkeep.storage import local as _io

# Names a user (or another tool) may well have in a model or run directory, many named like ours.
NAMES = [
    "config.json",
    "tokenizer.json",
    "README.md",
    "notes.txt",
    ".hidden",
    "model-extra.safetensors",
    "step_00000001",
    "step_00000002",
    "step_00000003",
    "step_00000009",
    "step_x",
    "packs",
    "distributed.json.bak",
    "manifest.json",
    ".step_00000002.tk-tmp-notmine",
    ".tensorkeep.lock.bak",
    "rank-00000-of-00001.tk.txt",
    "mine.tk",
    ".model.safetensors.tk-tmp-x-y",
]
INNER = ["notes.txt", "manifest.json", "model.tk", "00000001-deadbeef.tk", "sub"]
KINDS = ["file", "dir", "link-in", "link-out", "link-out-dir", "link-dangling"]


@st.composite
def foreign_trees(draw):
    """[(relative path, kind)] with parents before children and no path drawn twice."""
    out: dict[str, str] = {}
    for name in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=8)):
        kind = draw(st.sampled_from(KINDS))
        out[name] = kind
        if kind == "dir":
            for inner in draw(st.lists(st.sampled_from(INNER), unique=True, max_size=3)):
                out[f"{name}/{inner}"] = draw(st.sampled_from(["file", "link-out", "link-in"]))
    return list(out.items())


def build(work: str, target: str, tree: list[tuple[str, str]]) -> None:
    outside = os.path.join(work, "outside")
    os.makedirs(os.path.join(outside, "dir"), exist_ok=True)
    with open(os.path.join(outside, "precious.txt"), "w") as f:
        f.write("outside, never touched")
    # a real-looking checkpoint outside: a symlinked step pointing here must not lose its manifest
    with open(os.path.join(outside, "dir", "manifest.json"), "w") as f:
        f.write('{"format": "tensorkeep-checkpoint", "version": 1, "step": 1, "time": 0, "metrics": {}, "files": {}}')
    os.makedirs(target, exist_ok=True)
    for rel, kind in tree:
        p = os.path.join(target, rel)
        if kind == "file":
            with open(p, "wb") as f:
                f.write(f"user data in {rel}".encode())
        elif kind == "dir":
            os.mkdir(p)
        elif kind == "link-in":
            os.symlink("config.json" if "/" not in rel else "../config.json", p)
        elif kind == "link-out":
            os.symlink(os.path.join(outside, "precious.txt"), p)
        elif kind == "link-out-dir":
            os.symlink(os.path.join(outside, "dir"), p)
        else:
            os.symlink(os.path.join(work, "nowhere"), p)


def snapshot(root: str) -> dict[str, tuple]:
    """Every path below ``root`` (symlinks not followed): its kind and content or target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir",)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", f.read())
    return out


def check_untouched(
    before_target: dict, after_target: dict, before_out: dict, after_out: dict, foreign: list[tuple[str, str]]
) -> None:
    assert after_out == before_out, "something outside the target directory changed"
    for rel, _ in foreign:
        assert rel in after_target, f"{rel} was deleted"
        assert after_target[rel] == before_target[rel], f"{rel} was changed"


def _state(v: float) -> dict:
    return {"w": torch.full((64,), v), "b": torch.arange(8.0) + v}


def _ops(target: str, work: str):
    """Every operation that deletes or replaces, on ``target``; each may refuse with our own error."""
    sd = {f"layer{i}.weight": torch.full((40,), float(i)) for i in range(5)}

    def sharded():
        for size in (300, 100_000, 300, 500, 300):
            tk.save_sharded(sd, target, max_shard_size=size)
            back = tk.load(target)
            assert all(torch.equal(back[k], sd[k]) for k in sd)

    def model():
        net = torch.nn.Linear(4, 3)
        for size in (40, None, 40):
            if size is None:
                tk.save_sharded(net.state_dict(), target)
            else:
                tk.save_model(net, target, config={"in_features": 4, "out_features": 3}, max_shard_size=size)
        assert torch.equal(tk.load_model(target, allow=["torch.nn"]).weight, net.weight)

    def convert():
        src = os.path.join(work, "lin.pt")
        torch.save(sd, src)
        for args in ([src, target, "--max-shard-size", "300"], [src, target, "--max-shard-size", "2GB"]):
            r = CliRunner().invoke(cli, ["convert", *args])
            assert r.exit_code in (0, 2), r.output  # 2: refused, with one line saying why

    def manager():
        with tk.CheckpointManager(target, keep_last=1) as mgr:
            for step in (1, 2, 3, 4):
                mgr.save(step, _state(step))
            mgr.prune([tk.LatestN(1)])
        with tk.CheckpointManager(target, incremental=True, keep_last=1) as mgr:
            for step in (5, 6):
                mgr.save(step, _state(step))
        with tk.CheckpointManager(target) as mgr:
            st_ = _state(0)
            assert mgr.restore(st_) == 6 and torch.equal(st_["w"], _state(6)["w"])

    def prune_cli():
        with tk.CheckpointManager(target) as mgr:
            for step in (1, 2, 3):
                mgr.save(step, _state(step))
        _crashed_temps(target)
        before = snapshot(target)
        r = CliRunner().invoke(cli, ["prune", target, "--keep-last", "1", "--dry-run"])
        assert r.exit_code == 0, r.output
        assert snapshot(target) == before, "prune --dry-run changed the run directory"
        r = CliRunner().invoke(cli, ["prune", target, "--keep-last", "1"])
        assert r.exit_code == 0, r.output

    def distributed():
        for v in (1.0, 2.0):
            tk.save_distributed(_state(v), target)
        assert torch.equal(tk.load(target)["w"], _state(2.0)["w"])

    return {
        "save_sharded": sharded,
        "save_model": model,
        "convert": convert,
        "manager": manager,
        "prune": prune_cli,
        "save_distributed": distributed,
    }


def _crashed_temps(run: str) -> None:
    """What a killed save leaves: tensorkeep's own temporary names, of a process that is gone."""
    os.makedirs(os.path.join(run, ".step_00000007.tk-tmp-999999999-0123abcd"), exist_ok=True)
    with open(os.path.join(run, ".extra.tk.tk-tmp-999999999-0123abcd"), "wb") as f:
        f.write(b"half a file")


@pytest.mark.fuzz
@pytest.mark.parametrize("op", ["save_sharded", "save_model", "convert", "manager", "prune", "save_distributed"])
@settings(max_examples=sizes.ownership_examples, deadline=None, suppress_health_check=list(HealthCheck))
@given(tree=foreign_trees())
def test_only_what_tensorkeep_wrote_is_deleted_or_replaced(tmp_path_factory, op, tree):
    work = str(tmp_path_factory.mktemp("own"))
    target = os.path.join(work, "target")
    build(work, target, tree)
    outside = os.path.join(work, "outside")
    before_t, before_o = snapshot(target), snapshot(outside)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # foreign entries named like checkpoints are warned about
        try:
            _ops(target, work)[op]()
        except tk.TensorkeepError as e:  # refusing is allowed (e.g. a foreign file where a step goes)
            assert (
                "tensorkeep did not write" in str(e)
                or "not a checkpoint" in str(e)
                or "symbolic link" in str(e)
                or "not a directory" in str(e)
            ), e
    check_untouched(before_t, snapshot(target), before_o, snapshot(outside), tree)
    shutil.rmtree(work)


# ----------------------------------------------------------------------- the reported cases, one by one


def test_save_sharded_keeps_a_model_folders_other_files(tmp):
    for name, text in (("config.json", "{}"), ("tokenizer.json", "{}"), ("README.md", "# my model")):
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)
    sd = {f"w{i}": torch.full((100,), float(i)) for i in range(4)}
    for size in (800, 800, 100_000, 1200, 800):  # sharded -> same names, -> single, -> fewer, -> more
        tk.save_sharded(sd, tmp, max_shard_size=size)
        assert {"config.json", "tokenizer.json", "README.md"} <= set(os.listdir(tmp))
        back = tk.load(tmp)
        assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert sorted(n for n in os.listdir(tmp) if "safetensors" in n) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]


def test_convert_into_the_current_directory_keeps_the_project(tmp):
    torch.save({"w": torch.ones(300), "b": torch.zeros(300)}, os.path.join(tmp, "lin.pt"))
    with open(os.path.join(tmp, "train.py"), "w") as f:
        f.write("print('hi')")
    old = os.getcwd()
    os.chdir(tmp)
    try:
        r = CliRunner().invoke(cli, ["convert", "lin.pt", ".", "--max-shard-size", "1KB"])
    finally:
        os.chdir(old)
    assert r.exit_code == 0, r.output
    assert {"lin.pt", "train.py", "model.safetensors.index.json"} <= set(os.listdir(tmp))
    assert torch.equal(tk.load(tmp)["w"], torch.ones(300))


def test_opening_a_run_never_deletes_a_users_step_directory_or_packs(tmp):
    mine = layout.step_dir(tmp, 5)
    os.makedirs(os.path.join(tmp, "packs"))
    os.makedirs(mine)
    for p in (
        os.path.join(mine, "notes.txt"),
        os.path.join(tmp, "packs", "data.bin"),
        os.path.join(tmp, "packs", "00000001-deadbeef.tk"),
    ):  # a pack's name, not a tensorkeep file
        with open(p, "w") as f:
            f.write("mine")
    with pytest.warns(UserWarning, match="never deletes it"):
        with tk.CheckpointManager(tmp, incremental=True, keep_last=1) as mgr:
            mgr.save(1, _state(1))
            mgr.save(2, _state(2))
    assert open(os.path.join(mine, "notes.txt")).read() == "mine"
    assert {"data.bin", "00000001-deadbeef.tk"} <= set(os.listdir(os.path.join(tmp, "packs")))


def test_a_symlinked_step_is_neither_read_nor_deleted(tmp):
    outside = os.path.join(tmp, "elsewhere")
    run = os.path.join(tmp, "run")
    with tk.CheckpointManager(outside) as mgr:
        mgr.save(1, _state(1))
    os.makedirs(run)
    os.symlink(os.path.join(outside, "step_00000001"), os.path.join(run, "step_00000001"))
    with pytest.warns(UserWarning, match="symbolic link"):
        with tk.CheckpointManager(run, keep_last=1) as mgr:
            assert mgr.steps() == []
            mgr.save(2, _state(2))
            mgr.save(3, _state(3))
            assert mgr.steps() == [3]
    assert os.path.isfile(os.path.join(outside, "step_00000001", "manifest.json"))
    with tk.CheckpointManager(run) as mgr:  # the run still opens
        assert mgr.steps() == [3]


def test_a_temp_file_of_a_killed_save_inside_a_run_does_not_break_it(tmp):
    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(1, _state(1))
    stale = os.path.join(tmp, ".extra.tk.tk-tmp-999999999-0123abcd")
    with open(stale, "wb") as f:
        f.write(b"half")
    with tk.CheckpointManager(tmp) as mgr:
        assert mgr.steps() == [1]
    assert not os.path.exists(stale)  # its process is gone and the name is tensorkeep's


def test_prune_dry_run_deletes_nothing(tmp):
    with tk.CheckpointManager(tmp) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(step))
    _crashed_temps(tmp)
    before = snapshot(tmp)
    r = CliRunner().invoke(cli, ["prune", tmp, "--keep-last", "1", "--dry-run"])
    assert r.exit_code == 0 and "would delete 2" in r.output, r.output
    assert snapshot(tmp) == before


def test_retention_keeps_a_step_holding_foreign_files(tmp):
    with tk.CheckpointManager(tmp, keep_last=1) as mgr:
        mgr.save(1, _state(1))
        with open(os.path.join(tmp, "step_00000001", "eval.txt"), "w") as f:
            f.write("accuracy 0.9")
        with pytest.warns(UserWarning, match="tensorkeep did not write"):
            mgr.save(2, _state(2))
        assert mgr.steps() == [1, 2]
    assert open(os.path.join(tmp, "step_00000001", "eval.txt")).read() == "accuracy 0.9"


def test_resaving_a_step_holding_foreign_files_is_refused(tmp):
    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(1, _state(1))
        with open(os.path.join(tmp, "step_00000001", "eval.txt"), "w") as f:
            f.write("mine")
        with pytest.raises(tk.SaveError, match="eval.txt"):
            mgr.save(1, _state(5))
        st_ = _state(0)
        assert mgr.restore(st_) == 1 and torch.equal(st_["w"], _state(1)["w"])


def test_interrupted_retention_is_recognizable_and_finished_later(tmp, monkeypatch):
    with tk.CheckpointManager(tmp, keep_last=1) as mgr:
        mgr.save(1, _state(1))
        monkeypatch.setattr(_io, "remove_own_dir", lambda p, names: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            mgr.save(2, _state(2))
        monkeypatch.undo()
    left = [n for n in os.listdir(tmp) if n.startswith(".step_00000001.tk-tmp-")]
    assert left and not os.path.exists(layout.step_dir(tmp, 1))
    with pytest.warns(UserWarning, match="leftovers"):
        with tk.CheckpointManager(tmp) as mgr:
            assert mgr.steps() == [2]
    assert not any(n.startswith(".step_") for n in os.listdir(tmp))


def test_save_distributed_refuses_to_replace_a_directory_with_foreign_files(tmp):
    path = os.path.join(tmp, "ckpt")
    tk.save_distributed(_state(1), path)
    with open(os.path.join(path, "notes.txt"), "w") as f:
        f.write("mine")
    with pytest.raises(tk.SaveError, match="notes.txt"):
        tk.save_distributed(_state(2), path)
    assert open(os.path.join(path, "notes.txt")).read() == "mine"
    assert torch.equal(tk.load(path)["w"], _state(1)["w"])


def test_a_symlinked_lock_file_is_not_written_through(tmp):
    outside = os.path.join(tmp, "precious.txt")
    with open(outside, "w") as f:
        f.write("do not truncate me")
    run = os.path.join(tmp, "run")
    os.makedirs(run)
    os.symlink(outside, os.path.join(run, ".tensorkeep.lock"))
    try:
        with tk.CheckpointManager(run) as mgr:
            mgr.save(1, _state(1))
    except tk.TensorkeepError as e:
        assert "symbolic link" in str(e)
    assert open(outside).read() == "do not truncate me"


def test_pack_cleanup_removes_only_unreferenced_tensorkeep_packs(tmp):
    with tk.CheckpointManager(tmp, incremental=True) as mgr:
        mgr.save(1, _state(1))
    d = packs.packs_dir(tmp)
    tk.save({"x": torch.ones(2)}, os.path.join(d, "00000009-0123abcd.tk"))  # named and made like a pack: ours
    with open(os.path.join(d, "00000008-0123abcd.tk"), "w") as f:
        f.write("a user's file with a pack's name")
    os.symlink(os.path.join(d, "00000008-0123abcd.tk"), os.path.join(d, "00000007-0123abcd.tk"))
    assert packs.collect(tmp) == ["00000009-0123abcd.tk"]
    assert {"00000008-0123abcd.tk", "00000007-0123abcd.tk"} <= set(os.listdir(d))


def test_object_storage_cleanup_deletes_only_tensorkeeps_objects():
    fsspec = pytest.importorskip("fsspec")
    import uuid

    url = f"memory://tk-own-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    root = url[len("memory://") :]
    foreign = {
        f"{root}/step_00000009/notes.txt": b"mine",
        f"{root}/step_00000001/eval.json": b"{}",
        f"{root}/packs/readme.txt": b"mine",
        f"{root}/packs/00000001-deadbeef.tk": b"not a pack",
        f"{root}/config.json": b"{}",
    }
    for k, v in foreign.items():
        fs.pipe_file(k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tk.CheckpointManager(url, keep_last=1, incremental=True) as mgr:
            for step in (1, 2, 3):
                mgr.save(step, _state(step))
        with tk.CheckpointManager(url, keep_last=1) as mgr:
            mgr.save(4, _state(4))
            assert mgr.steps()[-1] == 4
    for k, v in foreign.items():
        assert fs.cat_file(k) == v, f"{k} was deleted or changed"


def test_the_demo_replaces_only_what_an_earlier_demo_made(tmp):
    from tensorkeep import demo

    mine = os.path.join(tmp, "mine")
    os.makedirs(mine)
    with open(os.path.join(mine, "thesis.tex"), "w") as f:
        f.write("years of work")
    with pytest.raises(SystemExit, match="was not made by the demo"):
        demo._fresh(mine)
    assert os.listdir(mine) == ["thesis.tex"]
    d = os.path.join(tmp, "demo-run")
    demo._fresh(d)
    os.makedirs(os.path.join(d, "run", "step_00000001"))
    with open(os.path.join(d, "notes.txt"), "w") as f:
        f.write("mine")
    demo._fresh(d)  # a second demo: its own entries go, the rest stays
    assert sorted(os.listdir(d)) == [".tensorkeep-demo", "notes.txt"]
