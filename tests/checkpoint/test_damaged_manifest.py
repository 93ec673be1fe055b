"""A damaged but valid-JSON manifest is a damaged checkpoint like any other: the manager opens,
restore() falls back to the previous one, list_checkpoints and `tensorkeep ls` say DAMAGED."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorkeep as tk
from tensorkeep.checkpoint import layout
from tensorkeep.cli import main as cli

DAMAGE = {
    "NUL in a file name": lambda m: m["files"].update({"mo\x00del.tk": m["files"].pop("values.tk")}),
    "time is a string": lambda m: m.update(time="soon"),
    "time too large for a float": lambda m: m.update(time=10**400),
    "negative size": lambda m: next(iter(m["files"].values())).update(size=-1),
    "crc32 is a number": lambda m: next(iter(m["files"].values())).update(crc32=7),
    "versions hold a list": lambda m: m.update(versions={"torch": [2]}),
    "a file name with a slash": lambda m: m["files"].update({"../x.tk": m["files"].pop("values.tk")}),
    "step is a float": lambda m: m.update(step=2.0),
}


def _run_with_damaged_step_2(tmp: str, damage) -> None:
    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(1, {"v": torch.tensor(1.0)})
        mgr.save(2, {"v": torch.tensor(2.0)})
    p = os.path.join(layout.step_dir(tmp, 2), layout.MANIFEST)
    m = json.loads(open(p).read())
    damage(m)
    with open(p, "w") as f:
        f.write(json.dumps(m))


@pytest.mark.parametrize("what", list(DAMAGE))
def test_a_damaged_manifest_is_a_damaged_checkpoint(tmp, what):
    _run_with_damaged_step_2(tmp, DAMAGE[what])
    with pytest.raises(tk.FormatError):
        layout.read_manifest(layout.step_dir(tmp, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tk.CheckpointManager(tmp) as mgr:  # opens
            state = {"v": torch.tensor(0.0)}
            with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
                assert mgr.restore(state) == 1 and state["v"] == 1.0  # falls back
    infos = tk.list_checkpoints(tmp)
    assert [(c.step, c.ok) for c in infos] == [(1, True), (2, False)]
    r = CliRunner().invoke(cli, ["ls", tmp])
    assert r.exit_code == 0 and "DAMAGED" in r.output, r.output


@settings(max_examples=60, deadline=None)
@given(
    value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        max_leaves=6,
    ),
    key=st.sampled_from(
        ["time", "step", "files", "metrics", "versions", "format", "version", "environment", "parts", "packs", "bytes"]
    ),
)
def test_any_value_in_any_field_gives_a_manifest_or_a_format_error(key, value):
    m = {
        "format": "tensorkeep-checkpoint",
        "version": 1,
        "step": 3,
        "time": 1.5,
        "metrics": {},
        "files": {"model.tk": {"size": 10, "crc32": "0badcafe", "key": "model", "kind": "state_dict"}},
        "versions": {},
    }
    m[key] = value
    try:
        layout.parse_manifest(json.dumps(m).encode(), "manifest.json")
    except tk.FormatError:
        pass


def test_a_fifo_where_a_checkpoint_file_should_be_is_damage_not_a_hang(tmp):
    import subprocess
    import sys
    import textwrap

    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(1, {"v": torch.tensor(1.0)})
        mgr.save(2, {"v": torch.tensor(2.0)})
    victim = os.path.join(layout.step_dir(tmp, 2), "values.tk")
    os.unlink(victim)
    os.mkfifo(victim)  # opening it for reading would block until a writer comes: forever
    code = textwrap.dedent(f"""
        import warnings, torch, tensorkeep as tk
        warnings.simplefilter("ignore")
        print([(c.step, c.ok) for c in tk.list_checkpoints({tmp!r})])
        with tk.CheckpointManager({tmp!r}) as mgr:
            st = {{"v": torch.tensor(0.0)}}
            print(mgr.restore(st), float(st["v"]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["[(1, True), (2, False)]", "1 1.0"], r.stdout


@pytest.mark.parametrize("metrics", [{"\ud800": 1.0}, {"loss": "\ud800"}])
def test_a_lone_surrogate_in_metrics_is_refused_and_nothing_is_written(tmp, metrics):
    with tk.CheckpointManager(tmp) as mgr:
        with pytest.raises((TypeError, ValueError), match="surrogate"):
            mgr.save(1, {"x": 1}, metrics=metrics)
        assert mgr.steps() == []
