"""Text from a file (tensor names, metadata, structure keys, metric names and values, paths, error
messages) never reaches the terminal raw: escape sequences could retitle or clear it, hide the rest
of the output (diff's verdict), or reorder what is shown (U+202E). The commands run in-process with
color=True, as on a terminal (click strips some ANSI sequences only when the output is a pipe)."""

import json
import os
import struct
import unicodedata
import warnings

import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorkeep as tk
from tensorkeep import cli

EVIL = "\x1b]0;pwned\x07\x1b[2J\x1b[H\x1b[8m\r\b\u202e\x9b31m\x7f\u2028\u200b\ufeff"


def _hidden(text: str) -> list[str]:
    """Characters a terminal may act on, other than the newlines the CLI prints itself."""
    return [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp", "Cn")]


def _cli(*args: str):
    r = CliRunner().invoke(cli.main, list(args), color=True)
    assert not _hidden(r.output), (args, [hex(ord(c)) for c in _hidden(r.output)], r.output)
    return r


def _hostile_file(path: str, tag: str = "") -> None:
    tk.save(
        {f"w{EVIL}{tag}": torch.ones(2), "nested": {f"k{EVIL}": torch.zeros(1), "s": f"v{EVIL}"}},
        path,
        metadata={f"m{EVIL}": f"v{EVIL}"},
    )


def test_inspect_escapes_names_metadata_and_structure(tmp):
    p = os.path.join(tmp, "h.tk")
    _hostile_file(p)
    r = _cli("inspect", p)
    assert r.exit_code == 0, r.output
    assert "w\\x1b]0;pwned\\x07\\x1b[2J" in r.output and "\\u202e" in r.output and "\\r\\x08" in r.output
    assert "metadata:" in r.output and "structure:" in r.output


def test_inspect_json_escapes_what_json_allows_raw(tmp):
    p = os.path.join(tmp, "h.tk")
    _hostile_file(p)
    r = _cli("inspect", p, "--json")
    assert r.exit_code == 0
    d = json.loads(r.output)  # still valid JSON, the same names
    assert {t["name"] for t in d["tensors"]} == {f"w{EVIL}", f"nested.k{EVIL}"}
    assert d["metadata"] == {f"m{EVIL}": f"v{EVIL}"}
    assert "\\u202e" in r.output and "\\u007f" in r.output and "\\u009b" in r.output


def test_diff_escapes_names_and_still_prints_its_verdict(tmp):
    a, b = os.path.join(tmp, "a.tk"), os.path.join(tmp, "b.tk")
    _hostile_file(a, "1")
    _hostile_file(b, "2")
    r = _cli("diff", a, b)
    assert r.exit_code == 1
    assert r.output.rstrip("\n").split("\n")[-1] == "files differ"
    assert "removed" in r.output and "added" in r.output and "\\x1b[8m" in r.output


def test_ls_escapes_metric_names_and_values(tmp):
    run = os.path.join(tmp, "run")
    with tk.CheckpointManager(run) as mgr:
        mgr.save(1, {"x": torch.ones(1)}, metrics={f"loss{EVIL}": 0.5, "note": f"fine{EVIL}"})
        mgr.save(2, {"x": torch.ones(1)}, metrics={f"loss{EVIL}": 0.25, "note": f"fine{EVIL}"})
    os.remove(os.path.join(run, "step_00000002", "values.tk"))  # a damaged checkpoint: its message is printed
    r = _cli("ls", run)
    assert r.exit_code == 0, r.output
    assert "loss\\x1b]0;pwned" in r.output and "DAMAGED" in r.output
    assert json.loads(_cli("ls", run, "--json").output)[0]["metrics"]["note"] == f"fine{EVIL}"


def test_verify_and_errors_escape_paths_and_messages(tmp):
    d = os.path.join(tmp, f"dir{EVIL}")
    os.makedirs(d)
    _hostile_file(os.path.join(d, "h.tk"))
    data = bytearray(open(os.path.join(d, "h.tk"), "rb").read())
    data[-1] ^= 1
    open(os.path.join(d, f"bad{EVIL}.tk"), "wb").write(data)
    r = _cli("verify", d)
    assert r.exit_code == 1 and "DAMAGED" in r.output and "\\x1b]0;pwned" in r.output
    assert r.output.rstrip("\n").split("\n")[-1].endswith("file(s) damaged")
    open(os.path.join(d, f"junk{EVIL}.tk"), "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\x1b]0;x\x07\r}")
    r = _cli("inspect", os.path.join(d, f"junk{EVIL}.tk"))
    assert r.exit_code == 2 and r.output.startswith("error: ")


def test_warnings_during_a_command_are_escaped_too(tmp, monkeypatch):
    run = os.path.join(tmp, "run")
    with tk.CheckpointManager(run) as mgr:
        mgr.save(1, {"x": torch.ones(1)})
    real = tk.list_checkpoints

    def warns(*a, **k):  # stands for any warning that quotes a name from a file
        warnings.warn(f"checkpoint has nothing for {EVIL}", stacklevel=2)
        return real(*a, **k)

    monkeypatch.setattr(tk, "list_checkpoints", warns)
    r = _cli("ls", run)
    assert r.exit_code == 0 and "UserWarning: checkpoint has nothing for \\x1b]0;pwned" in r.output, r.output


def _handmade(path: str, name: str, meta: dict) -> None:
    """A safetensors file whose JSON header escapes what tk.save would not write (NUL, lone surrogates)."""
    raw = json.dumps({"__metadata__": meta, name: {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()
    open(path, "wb").write(struct.pack("<Q", len(raw)) + raw + b"\0")


def test_nul_and_lone_surrogates_from_a_header_are_escaped_or_refused_in_one_line(tmp):
    p, q = os.path.join(tmp, "nul.safetensors"), os.path.join(tmp, "surrogate.safetensors")
    _handmade(p, "w\x00" + EVIL, {"k\x00": "v\x00" + EVIL})
    _handmade(q, "w\ud800" + EVIL, {"k": "v"})
    for args in (["inspect", p], ["inspect", p, "--json"], ["diff", p, p, "--all"]):
        r = _cli(*args)
        assert r.exit_code == 0 and ("\\x00" in r.output or "\\u0000" in r.output), (args, r.output)
    r = _cli("inspect", q)  # refused by the reader: its message names the tensor, escaped
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "\\ud800" in r.output, r.output


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(name=st.text(min_size=1, max_size=12), value=st.text(max_size=12))
def test_property_no_hidden_character_reaches_the_terminal(tmp, name, value):
    p = os.path.join(tmp, "p.tk")
    try:
        tk.save({name: torch.ones(1), "other": torch.zeros(1)}, p, metadata={"k" + name: value})
    except (ValueError, TypeError):  # a name save refuses (e.g. one its structure reserves) is not the point
        return
    _cli("inspect", p)
    _cli("inspect", p, "--json")
    r = _cli("diff", p, p, "--all")
    assert r.output.rstrip("\n").split("\n")[-1].startswith("files are equal")
