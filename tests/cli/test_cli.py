"""The real `tensorkeep` console script, run in a subprocess."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import tensorkeep as tk

EXE = os.path.join(os.path.dirname(sys.executable), "tensorkeep")


def run(*args, cwd=None):
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture
def sd():
    g = torch.Generator().manual_seed(0)
    return {
        "hidden.weight": torch.randn(256, 20, generator=g),
        "hidden.bias": torch.randn(256, generator=g),
        "output.weight": torch.randn(10, 256, generator=g),
        "steps": torch.tensor(7),
    }


@pytest.mark.slow
def test_help_on_every_command():
    for cmd in ([], ["inspect"], ["diff"], ["convert"], ["verify"], ["ls"], ["prune"]):
        r = run(*cmd, "--help")
        assert r.returncode == 0 and "Usage" in r.stdout, (cmd, r.stderr)


def test_inspect_table_filter_and_json(tmp, sd):
    p = os.path.join(tmp, "m.tk")
    tk.save({"model": sd, "epoch": 3}, p, metadata={"note": "hello"})
    r = run("inspect", p)
    assert r.returncode == 0, r.stderr
    assert "model.hidden.weight" in r.stdout and "F32" in r.stdout and "[256, 20]" in r.stdout
    assert "note: hello" in r.stdout and "'epoch': 3" in r.stdout and "crc32" in r.stdout
    r = run("inspect", p, "--filter", "*bias", "--json")
    d = json.loads(r.stdout)
    assert [t["name"] for t in d["tensors"]] == ["model.hidden.bias"]
    assert d["kind"] == "tensorkeep" and d["metadata"] == {"note": "hello"}


def test_diff_exit_codes(tmp, sd):
    a, b, c = (os.path.join(tmp, n) for n in ("a.tk", "b.tk", "c.tk"))
    tk.save(sd, a)
    tk.save(dict(sd), b)
    changed = dict(sd)
    changed["hidden.bias"] = sd["hidden.bias"] + 0.5
    changed["extra"] = torch.zeros(1)
    del changed["steps"]
    changed["output.weight"] = torch.zeros(5, 256)
    tk.save(changed, c)
    assert run("diff", a, b).returncode == 0
    r = run("diff", a, c)
    assert r.returncode == 1
    assert "hidden.bias" in r.stdout and "max abs 0.5" in r.stdout
    assert "added" in r.stdout and "removed" in r.stdout and "[10, 256] -> [5, 256]" in r.stdout


def test_verify_ok_and_damaged(tmp, sd):
    p = os.path.join(tmp, "m.tk")
    tk.save(sd, p)
    r = run("verify", p)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    data = bytearray(open(p, "rb").read())
    data[-100] ^= 1
    bad = os.path.join(tmp, "bad.tk")
    open(bad, "wb").write(data)
    r = run("verify", p, bad)
    assert r.returncode == 1
    assert "DAMAGED" in r.stdout and "bad.tk" in r.stdout and "damaged" in r.stdout


def test_convert_pt_safetensors_and_dtype(tmp, sd):
    pt = os.path.join(tmp, "m.pt")
    torch.save(sd, pt)
    out = os.path.join(tmp, "m.tk")
    r = run("convert", pt, out, "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    back = tk.load(out)
    assert back["hidden.weight"].dtype == torch.bfloat16 and back["steps"].dtype == torch.int64
    assert torch.equal(back["hidden.weight"], sd["hidden.weight"].to(torch.bfloat16))
    st = os.path.join(tmp, "m.safetensors")
    save_file(sd, st)
    r = run("convert", st, os.path.join(tmp, "m2.tk"))
    assert r.returncode == 0
    assert torch.equal(tk.load(os.path.join(tmp, "m2.tk"))["output.weight"], sd["output.weight"])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_convert_a_torch_dcp_directory(tmp, sd):
    import torch.distributed.checkpoint as dcp

    src = os.path.join(tmp, "dcp")
    dcp.save({"model": sd, "epoch": 3}, checkpoint_id=src)  # one process, no process group
    r = run("convert", src, os.path.join(tmp, "from-dcp.tk"))
    assert r.returncode == 0, r.stderr
    back = tk.load(os.path.join(tmp, "from-dcp.tk"))
    assert back["epoch"] == 3 and all(torch.equal(back["model"][k], v) for k, v in sd.items())
    r = run("convert", src, os.path.join(tmp, "bf16.tk"), "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert tk.load(os.path.join(tmp, "bf16.tk"))["model"]["hidden.weight"].dtype == torch.bfloat16


def test_convert_refuses_malicious_pickle_without_running_it(tmp):
    marker = os.path.join(tmp, "PWNED")
    evil = os.path.join(tmp, "evil.pt")
    with open(evil, "wb") as f:
        pickle.dump({"w": _Evil(marker)}, f, protocol=2)
    r = run("convert", evil, os.path.join(tmp, "out.tk"))
    assert r.returncode != 0
    assert "error:" in r.stderr and "Traceback" not in r.stderr
    assert "refuses" in r.stderr or "not a readable torch file" in r.stderr
    assert not os.path.exists(marker), "the pickle's code ran!"
    assert not os.path.exists(os.path.join(tmp, "out.tk"))


def test_errors_are_one_line_unless_debug(tmp):
    p = os.path.join(tmp, "junk.bin")
    open(p, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    r = run("inspect", p)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run("--debug", "inspect", p)
    assert "Traceback" in r.stderr


def _run_with_checkpoints(tmp):
    rd = os.path.join(tmp, "run")
    with tk.CheckpointManager(rd) as mgr:
        for s, loss in [(1, 0.9), (2, 0.4), (3, 0.6), (4, 0.5)]:
            mgr.save(s, {"model": torch.nn.Linear(2, 2), "epoch": s}, metrics={"val_loss": loss})
    return rd


def test_ls_marks_latest_best_damaged_and_uncommitted(tmp):
    rd = _run_with_checkpoints(tmp)
    os.makedirs(os.path.join(rd, ".step_00000005.tk-tmp-1-0a1b2c3d"))
    model3 = os.path.join(rd, "step_00000003", "model.tk")
    with open(model3, "r+b") as f:
        f.truncate(os.path.getsize(model3) - 3)
    r = run("ls", rd)
    assert r.returncode == 0, r.stderr
    lines = {l.split()[0]: l for l in r.stdout.splitlines() if l[:1].isdigit()}
    assert "best" in lines["2"] and "latest" in lines["4"] and "ok" in lines["1"]
    assert "DAMAGED" in lines["3"] and "UNCOMMITTED" in lines["5"]
    assert "val_loss=0.4" in lines["2"]
    d = json.loads(run("ls", rd, "--json").stdout)
    assert [c["step"] for c in d if c["best"]] == [2]


def test_ls_plot(tmp):
    pytest.importorskip("matplotlib")
    rd = _run_with_checkpoints(tmp)
    png = os.path.join(tmp, "m.png")
    r = run("ls", rd, "--plot", png)
    assert r.returncode == 0, r.stderr
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_prune_dry_run_then_for_real(tmp):
    rd = _run_with_checkpoints(tmp)
    r = run("prune", rd, "--keep-last", "1", "--keep-best", "val_loss", "--dry-run")
    assert r.returncode == 0 and "would delete 2 checkpoint(s): [1, 3]" in r.stdout
    assert len(tk.list_checkpoints(rd)) == 4
    r = run("prune", rd, "--keep-last", "1", "--keep-best", "val_loss")
    assert "deleted 2" in r.stdout and "kept: [2, 4]" in r.stdout
    assert [c.step for c in tk.list_checkpoints(rd)] == [2, 4]


def test_verify_a_run_directory(tmp):
    rd = _run_with_checkpoints(tmp)
    r = run("verify", rd)
    assert r.returncode == 0 and "OK" in r.stdout
    p = os.path.join(rd, "step_00000002", "model.tk")
    data = bytearray(open(p, "rb").read())
    data[-2] ^= 0x80
    open(p, "wb").write(data)
    r = run("verify", rd)
    assert r.returncode == 1 and "step_00000002" in r.stdout and "model.tk" in r.stdout
