"""Hostile files must not reach code: a name read from a file never causes an import, and
``load_model`` neither leaves the allowed modules nor lets a tiny file allocate a huge model."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
import torch

import tensorkeep as tk
import tensorkeep.core.dtypes
from support import TESTS_DIR
from tensorkeep.core.format import TK_KEY, TK_PREFIX, header_crc


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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


# ------------------------------------------------------------------ dtype names in a structure record

#: torch's lazy submodules, its deprecated attributes (each a factory called on access), other
#: submodules and attributes that are not dtypes, and near-misses of real dtype names.
HOSTILE_DTYPES: list[Any] = [
    "_inductor",
    "onnx",
    "_dynamo",
    "_export",
    "fx",
    "export",
    "compiler",
    "has_cuda",
    "has_mps",
    "has_cudnn",
    "has_mkldnn",
    "set_vital",
    "distributed",
    "testing",
    "nn",
    "jit",
    "Tensor",
    "__class__",
    "__dict__",
    "__getattr__",
    "torch.float32",
    "float32 ",
    "Float32",
    "",
    5,
    None,
    ["float32"],
    {"x": 1},
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
        assert good["d"] == [tk.core.dtypes.torch_dtype_named(n) for n in ("bfloat16", "float8_e4m3fn", "int64")]
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


# ------------------------------------------------------------------ load_model's class path

PKG = "tkh_pkg"  # made by the fixture below; the names are unique to this file
PKG_INIT = """
import torch
from torch import nn
import tkh_helper as helperlib
from tkh_helper import Exporter as Reexported


class Net(nn.Module):
    def __init__(self, n: int = 3):
        super().__init__()
        self.l = nn.Linear(n, 2)


class Outer:
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(2, 2)


class NeedsData(nn.Module):  # cannot be built on the meta device
    def __init__(self, n: int = 2):
        super().__init__()
        self.l = nn.Linear(n, 2)
        self.scale = float(torch.ones(1).sum().item())


class Deep(nn.Module):
    def __init__(self, layers: int = 1):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(layers)])


def __getattr__(name):  # a lazy attribute: looking it up imports a module
    import tkh_lazy
    return tkh_lazy
"""
HELPER = """
from torch import nn

built = []


class Exporter(nn.Module):
    def __init__(self, *a, **kw):
        super().__init__()
        built.append(1)
"""


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    d = tmp_path_factory.mktemp("pkgs")
    (d / PKG).mkdir()
    (d / PKG / "__init__.py").write_text(PKG_INIT)
    (d / "tkh_helper.py").write_text(HELPER)
    (d / "tkh_lazy.py").write_text("from torch import nn\nclass X(nn.Module):\n    pass\n")
    sys.path.insert(0, str(d))
    import tkh_pkg

    yield tkh_pkg
    sys.path.remove(str(d))


def saved_model(tmp: str, model: torch.nn.Module, config: dict, name: str = "m.tk") -> str:
    p = os.path.join(tmp, name)
    tk.save_model(model, p, config=config)
    return p


def set_model_info(p: str, **fields: Any) -> None:
    def edit(head: dict, rec: dict) -> None:
        info = json.loads(head["__metadata__"][tk.model.MODEL_KEY])
        info.update(fields)
        head["__metadata__"][tk.model.MODEL_KEY] = json.dumps(info)

    forge(p, edit)


@pytest.mark.parametrize(
    "cls, error",
    [
        (f"{PKG}:helperlib.Exporter", tk.UntrustedModelError),  # walks into another module
        (f"{PKG}:Reexported", tk.UntrustedModelError),  # defined in another module, imported into this one
        (f"{PKG}:torch._inductor.X", tk.UntrustedModelError),  # walks into torch
        (f"{PKG}:torch.nn.Linear", tk.UntrustedModelError),
        (f"{PKG}:lazy_thing.X", tk.FormatError),  # only the module's __getattr__ knows it
        (f"{PKG}:tkh_lazy", tk.FormatError),
        (f"{PKG}:Net.__init__", tk.FormatError),
        (f"{PKG}:Net.__class__", tk.FormatError),
        (f"{PKG}:Net.__mro__", tk.FormatError),
        (f"{PKG}:nn", tk.UntrustedModelError),
        (f"{PKG}:", tk.FormatError),
        (f"{PKG}:Net..X", tk.FormatError),
        (f"{PKG}:<locals>.Net", tk.FormatError),
        (f"{PKG}.:Net", tk.FormatError),
        (f".{PKG}:Net", tk.FormatError),
        (f"{PKG}..x:Net", tk.FormatError),
    ],
)
def test_class_path_stays_in_the_allowed_module(pkg, tmp, cls, error):
    import tkh_helper

    inductor_before = "torch._inductor" in sys.modules
    p = saved_model(tmp, pkg.Net(), {"n": 3})
    set_model_info(p, **{"class": cls})
    with pytest.raises(error) as e:
        tk.load_model(p, allow=[PKG])
    assert p in str(e.value)
    assert tkh_helper.built == []
    assert "tkh_lazy" not in sys.modules
    assert "torch._inductor" in sys.modules or not inductor_before


def test_class_paths_that_stay_inside_load(pkg, tmp):
    p = saved_model(tmp, pkg.Outer.Inner(), {})
    assert json.loads(tk.open(p).metadata[tk.model.MODEL_KEY])["class"] == f"{PKG}:Outer.Inner"
    assert isinstance(tk.load_model(p, allow=[PKG]), pkg.Outer.Inner)
    p = saved_model(tmp, torch.nn.Linear(3, 2), {"in_features": 3, "out_features": 2})
    set_model_info(p, **{"class": "torch.nn:Linear"})  # re-exported by an allowed package from an allowed module
    assert isinstance(tk.load_model(p, allow=["torch.nn"]), torch.nn.Linear)
    with pytest.raises(tk.UntrustedModelError):
        tk.load_model(p, allow=["torch.nn.modules.conv"])


def test_classes_that_need_real_data_still_load(pkg, tmp):
    net = pkg.NeedsData(4)
    m = tk.load_model(saved_model(tmp, net, {"n": 4}), allow=[PKG])
    assert torch.equal(m.l.weight, net.l.weight)


def test_tied_model_loads_through_the_meta_check(tmp):
    from models_for_tests import TiedLM

    net = TiedLM(vocab=30, dim=4)
    m = tk.load_model(saved_model(tmp, net, {"vocab": 30, "dim": 4}), allow=["models_for_tests"])
    assert m.head.weight is m.embed.weight and torch.equal(m.embed.weight, net.embed.weight)


@pytest.mark.parametrize("config", [{"n": -1}, {"n": "x"}, {"m": 3}, {"n": 3, "extra": 1}])
def test_config_that_does_not_build_is_a_format_error(pkg, tmp, config):
    p = saved_model(tmp, pkg.Net(), {"n": 3})
    set_model_info(p, config=config)
    with pytest.raises(tk.FormatError, match="config"):
        tk.load_model(p, allow=[PKG])


# ------------------------------------------------------------------ a tiny file, a huge config

HUGE = [  # each would allocate and initialise ~2.4 GB
    (
        "torch.nn:Linear",
        lambda: torch.nn.Linear(4, 3),
        {"in_features": 4, "out_features": 3},
        {"in_features": 100_000, "out_features": 6_000},
    ),  # shapes differ
    (
        "torch.nn:LayerNorm",
        lambda: torch.nn.LayerNorm(5, elementwise_affine=False),
        {"normalized_shape": 5, "elementwise_affine": False},
        {"normalized_shape": 300_000_000, "elementwise_affine": True},
    ),  # tensors missing from the file
]


def test_huge_config_fails_before_allocating(tmp):
    paths = []
    for i, (cls, make, config, huge) in enumerate(HUGE):
        paths.append(saved_model(tmp, make(), config, f"huge{i}.tk"))
        set_model_info(paths[-1], **{"class": cls, "config": huge})
        assert os.path.getsize(paths[-1]) < 2000
    out = run_python(f"""
        import resource, torch, tensorkeep as tk
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for p in {paths!r}:
            try:
                tk.load_model(p, allow=["torch.nn"])
                print("loaded")
            except tk.MismatchError as e:
                print("refused", p in str(e))
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)  # MiB
    """)
    *verdicts, grew_mib = out.strip().splitlines()[-3:]
    assert verdicts == ["refused True"] * 2
    assert int(grew_mib) < 1024  # before: 2266 MiB


def test_config_asking_for_a_million_layers_is_refused_quickly(pkg, tmp):
    p = saved_model(tmp, pkg.Deep(2), {"layers": 2})
    set_model_info(p, config={"layers": 10**7})
    with pytest.raises(tk.MismatchError, match="far more than the file's 4 tensors"):
        tk.load_model(p, allow=[PKG])  # before: 10 million layers, initialised for real
    assert isinstance(tk.load_model(saved_model(tmp, pkg.Deep(1000), {"layers": 1000}), allow=[PKG]), pkg.Deep)


def test_building_on_the_meta_device_imports_nothing(tmp):
    nn = torch.nn
    models = {  # class, config
        "emb": (nn.Embedding, {"num_embeddings": 5, "embedding_dim": 3}),
        "tr": (
            nn.Transformer,
            {"d_model": 4, "nhead": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 8},
        ),
        "lstm": (nn.LSTM, {"input_size": 3, "hidden_size": 4, "num_layers": 2}),
        "bn": (nn.BatchNorm2d, {"num_features": 3}),
        "conv": (nn.Conv2d, {"in_channels": 3, "out_channels": 4, "kernel_size": 3}),
        "mha": (nn.MultiheadAttention, {"embed_dim": 4, "num_heads": 2}),
    }
    paths = [saved_model(tmp, cls(**config), config, f"{k}.tk") for k, (cls, config) in models.items()]
    warm = saved_model(tmp, nn.Linear(2, 2), {"in_features": 2, "out_features": 2}, "warm.tk")
    out = run_python(f"""
        import sys, warnings
        import tensorkeep as tk
        warnings.simplefilter("ignore")
        tk.load_model({warm!r}, allow=["torch.nn"])
        before = set(sys.modules)
        for p in {paths!r}:
            tk.load_model(p, allow=["torch.nn"])
        print(sorted(set(sys.modules) - before))
    """)
    assert out.strip().splitlines()[-1] == "[]"  # on meta, nn.init.normal_ imported torch._dynamo (seconds)
