"""Hostile files must not reach code: a name read from a file never causes an import, and
``load_model`` neither leaves the allowed modules nor lets a tiny file allocate a huge model."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from typing import Any, Callable

import pytest
import torch

import tensorkeep as tk
from tensorkeep.format import TK_KEY, TK_PREFIX, header_crc

HERE = os.path.dirname(os.path.abspath(__file__))


def forge(path: str, edit: Callable[[dict, dict], None]) -> None:
    """Rewrite ``path``'s header with ``edit(header, record)`` and reseal its checksum, as a forger would."""
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    head = json.loads(data[8 : 8 + n])
    record = json.loads(head["__metadata__"][TK_KEY])
    edit(head, record)
    head["__metadata__"][TK_KEY] = json.dumps(record, separators=(",", ":"))
    meta = head.pop("__metadata__")  # the checksum key must stay first
    text = json.dumps({"__metadata__": meta, **head}, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    out = bytearray(struct.pack("<Q", len(text)) + text + data[8 + n :])
    at = 8 + len(TK_PREFIX)
    out[at : at + 8] = b"%08x" % header_crc(bytes(out[: 8 + len(text)]))
    open(path, "wb").write(out)


def run_python(code: str, timeout: float = 300) -> str:
    """Run ``code`` in a fresh interpreter (with tests/ on the path); its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


# ------------------------------------------------------------------ dtype names in a structure record

#: torch's lazy submodules, its deprecated attributes (each a factory called on access), other
#: submodules and attributes that are not dtypes, and near-misses of real dtype names.
HOSTILE_DTYPES: list[Any] = [
    "_inductor", "onnx", "_dynamo", "_export", "fx", "export", "compiler", "has_cuda", "has_mps",
    "has_cudnn", "has_mkldnn", "set_vital", "distributed", "testing", "nn", "jit", "Tensor", "__class__",
    "__dict__", "__getattr__", "torch.float32", "float32 ", "Float32", "", 5, None, ["float32"], {"x": 1},
]


def test_dtype_names_from_a_file_import_nothing(tmp):
    paths = []
    for i, name in enumerate(HOSTILE_DTYPES):
        p = os.path.join(tmp, f"h{i}.tk")
        tk.save({"d": torch.float32, "w": torch.ones(2)}, p)
        forge(p, lambda head, rec, name=name: rec["tree"]["d"][0][1].update(dt=name))
        paths.append(p)
    good = os.path.join(tmp, "good.tk")
    tk.save({"d": [torch.bfloat16, torch.float8_e4m3fn, torch.long], "w": torch.ones(2)}, good)
    out = run_python(f"""
        import json, sys, warnings
        import tensorkeep as tk
        good = tk.load({good!r})  # anything a normal load imports is imported now
        assert good["d"] == [tk.dtypes.torch_dtype_named(n) for n in ("bfloat16", "float8_e4m3fn", "int64")]
        before = set(sys.modules)
        errors = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for p in {paths!r}:
                for how in (lambda: tk.load(p), lambda: tk.load(p, lazy=True), lambda: tk.open(p).load()):
                    try:
                        how()
                        errors.append(p + ": loaded")
                    except tk.FormatError as e:
                        if "unknown torch dtype" not in str(e):
                            errors.append(str(e))
        print(json.dumps({{"new": sorted(set(sys.modules) - before), "errors": errors,
                           "warnings": [str(w.message) for w in caught]}}))
    """)
    got = json.loads(out.strip().splitlines()[-1])
    assert got == {"new": [], "errors": [], "warnings": []}


def test_dtype_names_written_by_save_load_back(tmp):
    every = [v for v in vars(torch).values() if isinstance(v, torch.dtype)]
    p = os.path.join(tmp, "dtypes.tk")
    tk.save(every, p)
    assert tk.load(p) == every
