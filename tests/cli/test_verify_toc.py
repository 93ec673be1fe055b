"""`tensorkeep verify DIR` checks a directory against its own table of contents (a checkpoint's
manifest.json, a model's model.safetensors.index.json, distributed.json, a run's steps and packs):
a file it names that is missing, or a tensor file it does not name, is damage; files that hold no
tensors (config.json, README.md) are not. Also: inspection.diff stays near-linear in the tensor count."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorkeep as tk
from tensorkeep import inspection

EXE = os.path.join(os.path.dirname(sys.executable), "tensorkeep")
NOT_TENSORS = {
    "config.json": b'{"hidden_size": 4}',
    "tokenizer.json": b"{}",
    "README.md": b"# my model\n",
    "tokenizer.model": b"\x0a\x05hello" * 10,
    ".gitattributes": b"*.safetensors filter=lfs\n",
}


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(8, generator=g), "b": torch.randn(3, 2, generator=g), "c": torch.arange(5)}


def _damaged(res) -> str:
    return "\n".join(str(p) for p in res.problems)


def _model_dir(tmp: str) -> str:
    d = os.path.join(tmp, "model")
    tk.save_sharded(_state(), d, max_shard_size=40)  # three shards and an index
    return d


def _run(tmp: str, incremental: bool = False) -> str:
    d = os.path.join(tmp, "run")
    with tk.CheckpointManager(d, incremental=incremental) as mgr:
        for step in (1, 2):
            mgr.save(step, {"model": {"w": torch.full((4,), float(step)), "frozen": torch.ones(3)}, "epoch": step})
    return d


def _dist_dir(tmp: str) -> str:
    d = os.path.join(tmp, "dist")
    tk.save_distributed(_state(), d)  # no process group: a group of one
    return d


def _step(run: str, step: int = 2) -> str:
    return os.path.join(run, f"step_{step:08d}")


def test_intact_directories_with_foreign_non_tensor_files_verify(tmp):
    for d in (_model_dir(tmp), _run(tmp), _step(_run(os.path.join(tmp, "x"))), _dist_dir(tmp)):
        for name, data in NOT_TENSORS.items():
            open(os.path.join(d, name), "wb").write(data)
        res = inspection.verify(d)
        assert res.ok, _damaged(res)
        assert res.checked_files >= 1


def test_each_missing_shard_is_damage_and_a_stale_one_still_is(tmp):
    d = _model_dir(tmp)
    first = os.path.join(d, "model-00001-of-00003.safetensors")
    shutil.copy(first, os.path.join(d, "model-00009-of-00009.safetensors"))
    os.remove(os.path.join(d, "model-00002-of-00003.safetensors"))
    os.remove(os.path.join(d, "model-00003-of-00003.safetensors"))
    text = _damaged(inspection.verify(d))
    assert all(n in text for n in ("model-00002-of-00003", "model-00003-of-00003", "model-00009-of-00009")), text


def test_a_shard_the_index_does_not_name_is_damage(tmp):
    d = _model_dir(tmp)
    tk.save_sharded({"old": torch.zeros(2)}, os.path.join(tmp, "other"))
    shutil.copy(os.path.join(tmp, "other", "model.safetensors"), os.path.join(d, "model-00004-of-00004.safetensors"))
    res = inspection.verify(d)
    assert not res.ok and "model-00004-of-00004.safetensors" in _damaged(res)


def test_a_shard_swapped_for_another_lacks_its_tensors(tmp):
    d = _model_dir(tmp)
    one, two = (os.path.join(d, f"model-0000{i}-of-00003.safetensors") for i in (1, 2))
    shutil.copy(one, two)  # intact file, wrong tensors
    res = inspection.verify(d)
    assert not res.ok and "lacks" in _damaged(res), _damaged(res)


@pytest.mark.parametrize("incremental", [False, True])
def test_a_checkpoint_missing_a_file_is_damage_in_the_step_and_in_the_run(tmp, incremental):
    run = _run(tmp, incremental)
    m = json.load(open(os.path.join(_step(run), "manifest.json")))
    if incremental:  # the tensors live in the run's packs
        victim = os.path.join(run, "packs", sorted(m["packs"])[-1])
    else:
        victim = os.path.join(_step(run), sorted(m["files"])[0])
    os.remove(victim)
    for d in (run, _step(run)):
        res = inspection.verify(d)
        assert not res.ok and os.path.basename(victim) in _damaged(res), (d, _damaged(res))
    assert inspection.verify(_step(run, 1)).ok  # it needs nothing step 2 wrote


def test_an_extra_tensor_file_in_a_step_is_damage(tmp):
    run = _run(tmp)
    torch.save({"x": torch.ones(1)}, os.path.join(_step(run), "sneaky.pt"))
    res = inspection.verify(run)
    assert not res.ok and "sneaky.pt" in _damaged(res) and "does not list" in _damaged(res)


def test_a_damaged_manifest_or_a_step_without_one_is_damage(tmp):
    run = _run(tmp)
    p = os.path.join(_step(run, 1), "manifest.json")
    open(p, "w").write(open(p).read().replace('"time":', '"time":"soon","x":'))
    os.remove(os.path.join(_step(run, 2), "manifest.json"))
    text = _damaged(inspection.verify(run))
    assert "step_00000001" in text and "step_00000002" in text, text


def test_a_step_renamed_to_another_step_is_damage(tmp):
    run = _run(tmp)
    os.rename(_step(run, 1), _step(run, 5))
    assert "says step 1" in _damaged(inspection.verify(run))


def test_unfinished_saves_and_unreferenced_packs_are_notes_not_damage(tmp):
    run = _run(tmp, incremental=True)
    os.makedirs(os.path.join(run, f".step_00000003.tk-tmp-{os.getpid()}-0a1b2c3d"))
    shutil.copy(
        os.path.join(run, "packs", os.listdir(os.path.join(run, "packs"))[0]),
        os.path.join(run, "packs", "00000003-0badf00d.tk"),
    )
    res = inspection.verify(run)
    assert res.ok, _damaged(res)
    assert any("unfinished save" in n for n in res.notes) and any("00000003-0badf00d" in n for n in res.notes)


def test_distributed_checkpoint_missing_or_extra_rank_file_is_damage(tmp):
    d = _dist_dir(tmp)
    rank = next(n for n in os.listdir(d) if n.startswith("rank-"))
    shutil.copy(os.path.join(d, rank), os.path.join(d, "rank-00001-of-00002.tk"))
    assert "rank-00001-of-00002.tk" in _damaged(inspection.verify(d))
    os.remove(os.path.join(d, "rank-00001-of-00002.tk"))
    os.remove(os.path.join(d, rank))
    assert rank in _damaged(inspection.verify(d))


def test_a_run_inside_a_plain_directory_is_checked_too(tmp):
    run = _run(tmp)
    os.remove(os.path.join(_step(run, 1), "values.tk"))
    res = inspection.verify(tmp)
    assert not res.ok and "values.tk" in _damaged(res)


def test_another_programs_manifest_json_is_not_a_checkpoint(tmp):
    tk.save(_state(), os.path.join(tmp, "x.tk"))
    open(os.path.join(tmp, "manifest.json"), "w").write('{"name": "my web app", "icons": []}')
    res = inspection.verify(tmp)
    assert res.ok and res.checked_files == 1, _damaged(res)


def test_a_directory_without_tensor_files_says_so(tmp):
    open(os.path.join(tmp, "README.md"), "w").write("# nothing here\n")
    res = inspection.verify(tmp)
    assert res.ok and res.checked_files == 0 and any("no tensor files" in n for n in res.notes)


def test_fifos_where_files_should_be_are_damage_not_a_hang(tmp):
    run = _run(tmp)
    step = _step(run, 1)
    m = json.load(open(os.path.join(step, "manifest.json")))
    victim = sorted(m["files"])[0]
    os.remove(os.path.join(step, victim))
    os.mkfifo(os.path.join(step, victim))
    weird = os.path.join(tmp, "weird")
    os.makedirs(weird)
    for name in ("manifest.json", "distributed.json", "model.safetensors.index.json", "x.tk"):
        os.mkfifo(os.path.join(weird, name))
    # in a child: a thread blocked opening a FIFO may never see an alarm
    r = subprocess.run([EXE, "verify", tmp], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and victim in r.stdout and "not a regular file" in r.stdout, r.stdout + r.stderr
    assert all(n in r.stdout for n in ("manifest.json", "distributed.json", "model.safetensors.index.json"))


def test_cli_exit_code_for_a_missing_file(tmp):
    d = _model_dir(tmp)
    r = subprocess.run([EXE, "verify", d], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    os.remove(os.path.join(d, "model-00003-of-00003.safetensors"))
    r = subprocess.run([EXE, "verify", d], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "DAMAGED" in r.stdout and "model-00003-of-00003" in r.stdout, r.stdout + r.stderr


_NAME = st.text("abcxyz_-.", min_size=1, max_size=12).filter(lambda n: n not in (".", "..") and not n.startswith("."))


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    kind=st.sampled_from(["model", "step", "run", "dist"]),
    change=st.sampled_from(["remove", "add", "foreign"]),
    pick=st.integers(0, 100),
    name=_NAME,
    text=st.text(max_size=40),
)
def test_property_every_missing_or_extra_tensor_file_is_damage_and_nothing_else_is(tmp, kind, change, pick, name, text):
    base = os.path.join(tmp, f"{kind}-{change}-{pick}-{len(os.listdir(tmp))}")
    d = {"model": _model_dir, "run": _run, "dist": _dist_dir, "step": lambda t: _step(_run(t))}[kind](base)
    if kind == "run":
        d = _step(d, 1 + pick % 2)  # change a checkpoint, verify the whole run
    data = sorted(n for n in os.listdir(d) if n.endswith((".tk", ".safetensors")))
    if change == "remove":
        os.remove(os.path.join(d, data[pick % len(data)]))
    elif change == "add":  # in a model directory, a stale shard (other tensor files there are not its weights)
        extra = f"model-{pick:05d}-of-00099.safetensors" if kind == "model" else f"extra{name}.tk"
        shutil.copy(os.path.join(d, data[pick % len(data)]), os.path.join(d, extra))
    else:  # a file that holds no tensors, named anything but a tensor file
        target = os.path.join(d, f"{name}.txt")
        if not os.path.exists(target):
            open(target, "w").write(text)
    res = inspection.verify(os.path.dirname(d) if kind == "run" else d)
    assert res.ok == (change == "foreign"), (kind, change, _damaged(res))


# --- inspection.diff at scale (issue 14) -------------------------------------------------------------


@contextmanager
def _deadline(seconds: float):
    """Fail instead of running for hours: generous, so it catches only an accidental quadratic."""

    def fire(*_):
        raise TimeoutError(f"no answer within {seconds} s: is something quadratic in the tensor count again?")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _safetensors(path: str, names: list[str]) -> None:
    """A plain safetensors file of one-byte tensors, written directly (tk.save of 200k tensors is slow)."""
    header = {n: {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i, n in enumerate(names)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(len(names)))


@pytest.mark.slow
def test_diff_of_200k_tensors_is_not_quadratic(tmp):
    n, shared = 200_000, 1000  # a quadratic diff needs hours for this; a linear one, seconds
    a, b = os.path.join(tmp, "a.safetensors"), os.path.join(tmp, "b.safetensors")
    _safetensors(a, [f"t{i}" for i in range(n)])
    _safetensors(b, [f"t{i}" for i in range(shared)] + [f"new{i}" for i in range(n - shared)])
    with _deadline(600):
        out = inspection.diff(a, b)
    status = {}
    for d in out:
        status[d.status] = status.get(d.status, 0) + 1
    assert status == {"equal": shared, "removed": n - shared, "added": n - shared}
