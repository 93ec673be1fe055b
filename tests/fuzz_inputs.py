"""Inputs for the mutation fuzzer (tests/fuzz_mutation.py): seed files and their mutations.

Seeds are small valid files made by ``tk.save`` (several dtypes, 0-dim, empty, nested, tied,
NumPy, multi-block checksums) and by safetensors. ``make_case`` takes one and applies a header-JSON
edit (a number in data_offsets or shape, a dtype, a duplicate key, a renamed, dropped or reordered
entry, the tensorkeep structure record) and/or a few byte-level mutations: bit flips, byte sets,
insertions, deletions, splices of two files, truncations, extensions, header-length changes.
After some mutations of a tensorkeep file the header checksum is recomputed ("forged"), so that
the parser behind the checksum is fuzzed as well.

``make_case`` only calls ``randrange`` and ``randbytes``, so a ``random.Random`` drives it in CI
and an atheris ``FuzzedDataProvider`` (through ``ProviderRandom``) under coverage guidance.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save

import tensorkeep as tk
from tensorkeep import knobs

# Written out here rather than imported, so the oracle does not share tensorkeep's code.
TK_PREFIX = b'{"__metadata__":{"tensorkeep.crc32":"'
ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    obj: Any  # what loading it must give
    is_tk: bool


@dataclass
class Case:
    data: bytes
    seed: int
    ops: list[str]
    forged: bool  # a tensorkeep header checksum recomputed by the harness (or an arbitrary input)


# ----------------------------------------------------------------------------- seeds


def _tk_objects() -> list[tuple[str, Any, int]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, generator=g)
    mixed = {
        "w": w,
        "tied": w,
        "b": torch.arange(3),
        "h": torch.tensor([1.5, -2.0], dtype=torch.float16),
        "bf": torch.ones(1, 2, dtype=torch.bfloat16),
        "i8": torch.tensor([-1, 2, 3, 4], dtype=torch.int8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(7.0),
        "empty": torch.zeros(0, 4),
        "np": np.arange(3, dtype=np.int16),
        "nps": np.float64(1.5),
        "plain": [1, 2.5, "x", None, True],
        "meta": (torch.Size([2, 3]), torch.float16, torch.device("cpu")),
        "p": torch.nn.Parameter(torch.ones(2)),
    }
    nested = {
        "a": {"b": [torch.arange(10, dtype=torch.int64), {"c": torch.zeros(3, dtype=torch.complex64)}]},
        "u8": torch.arange(20, dtype=torch.uint8),
        "f8": torch.ones(4).to(torch.float8_e4m3fn),
        "od": OrderedDict(x=torch.ones(1, 1, 1)),
        7: torch.ones(2, requires_grad=True),
        "e": np.zeros((3, 0)),
    }
    # (name, object, checksum block size): 16-byte blocks give tensors several checksums each
    return [
        ("tk-mixed", mixed, 1 << 20),
        ("tk-nested", nested, 16),
        ("tk-list", [torch.ones(0), 1.5, None], 1 << 20),
        ("tk-tensor", torch.arange(4, dtype=torch.int32), 8),
        ("tk-empty", {}, 1 << 20),
    ]


def _plain_objects() -> list[tuple[str, dict[str, torch.Tensor], dict[str, str] | None]]:
    # at most one metadata entry each: safetensors writes metadata in HashMap order, which differs
    # from run to run, and an input must be the same bytes whenever its stream and index are replayed
    g = torch.Generator().manual_seed(1)
    return [
        (
            "st-mixed",
            {
                "a": torch.randn(2, 2, generator=g),
                "b": torch.arange(3, dtype=torch.int8),
                "c": torch.tensor(2.5, dtype=torch.float64),
                "e": torch.zeros(0, 3),
            },
            {"k": "v"},
        ),
        (
            "st-dtypes",
            {
                "x": torch.ones(2, 2, dtype=torch.bfloat16),
                "y": torch.tensor([1.0, -0.5, 2], dtype=torch.float16),
                "z": torch.tensor([[7], [-8]], dtype=torch.int32),
                "m": torch.tensor([True, False, True, True]),
                "u": torch.arange(5, dtype=torch.uint8),
                "l": torch.tensor([2**40]),
                "f8": torch.ones(2).to(torch.float8_e5m2),
                "c": torch.ones(1, dtype=torch.complex64),
            },
            None,
        ),
        ("st-none", {}, None),
        ("st-one", {"only": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, {"format": "pt"}),
    ]


def make_seeds(tmpdir: str) -> list[Seed]:
    seeds = []
    real_block = knobs.BLOCK_BYTES
    for name, obj, block in _tk_objects():
        p = os.path.join(tmpdir, name)
        knobs.BLOCK_BYTES = block
        try:
            tk.save(obj, p, durable=False)
        finally:
            knobs.BLOCK_BYTES = real_block
        seeds.append(Seed(name, open(p, "rb").read(), obj, True))
    for name, tensors, meta in _plain_objects():
        seeds.append(Seed(name, st_save(tensors, meta), tensors, False))
    return seeds


# ----------------------------------------------------------------------------- mutations


def _pick(r: Any, seq: Any) -> Any:
    return seq[r.randrange(len(seq))]


def header_len(b: bytes | bytearray) -> int:
    return struct.unpack("<Q", bytes(b[:8]))[0] if len(b) >= 8 else -1


def _pos(r: Any, b: bytearray) -> int:
    """A position, mostly in the length prefix and header, where the parser decides things."""
    end, n = len(b), header_len(b)
    if n >= 0 and r.randrange(4):
        end = min(len(b), 8 + n + 1)
    return r.randrange(max(end, 1))


INTERESTING = [
    0,
    1,
    0x7F,
    0x80,
    0xFF,
    ord("{"),
    ord("}"),
    ord("["),
    ord("]"),
    ord('"'),
    ord(","),
    ord(":"),
    ord("0"),
    ord("9"),
    ord("-"),
    ord(" "),
    ord("\\"),
    ord("e"),
    ord("."),
    0xC0,
    0xED,
]


def m_flip(r: Any, b: bytearray, seeds: list[Seed]) -> None:
    if b:
        b[_pos(r, b)] ^= 1 << r.randrange(8)


def m_set(r: Any, b: bytearray, seeds: list[Seed]) -> None:
    if b:
        b[_pos(r, b)] = _pick(r, INTERESTING) if r.randrange(2) else r.randrange(256)


def m_insert(r: Any, b: bytearray, seeds: list[Seed]) -> None:
    i = _pos(r, b)
    if r.randrange(2) and b:
        j = r.randrange(len(b))
        b[i:i] = b[j : j + r.randrange(1, 17)]  # a copy of other bytes of the file: a repeated token or field
    else:
        b[i:i] = r.randbytes(r.randrange(1, 9))


def m_delete(r: Any, b: bytearray, seeds: list[Seed]) -> None:
    if b:
        i = _pos(r, b)
        del b[i : i + r.randrange(1, 17)]


def m_splice(r: Any, b: bytearray, seeds: list[Seed]) -> None:
    other = _pick(r, seeds).data
    i = r.randrange(len(b) + 1)
    b[i:] = other[r.randrange(len(other) + 1) :]


def m_truncate(r: Any, b: bytearray, seeds: list[Seed]) -> None:
    del b[r.randrange(len(b) + 1) :]


def m_extend(r: Any, b: bytearray, seeds: list[Seed]) -> None:
    n = r.randrange(1, 65)
    b += bytes(n) if r.randrange(2) else r.randbytes(n)


def m_length(r: Any, b: bytearray, seeds: list[Seed]) -> None:
    if len(b) < 8:
        return
    n = header_len(b)
    new = _pick(
        r,
        [
            n + r.randrange(-9, 10),
            0,
            1,
            2,
            len(b) - 8,
            len(b) - 7,
            n * 2,
            n // 2,
            2**64 - 1,
            2**63,
            knobs.MAX_HEADER_BYTES,
            knobs.MAX_HEADER_BYTES + 1,
            r.randrange(2**64),
        ],
    )
    b[:8] = struct.pack("<Q", new % 2**64)


BYTE_OPS: list[Callable[[Any, bytearray, list[Seed]], None]] = [
    m_flip,
    m_flip,
    m_flip,
    m_set,
    m_set,
    m_insert,
    m_delete,
    m_splice,
    m_truncate,
    m_extend,
    m_length,
]


def _number(r: Any, v: Any) -> Any:
    v = v if type(v) is int else 0
    return _pick(
        r,
        [
            v + 1,
            v - 1,
            v + 8,
            v - 8,
            v * 2,
            0,
            -1,
            2**31,
            2**62,
            2**63,
            2**64,
            v + 2**64,
            float(v),
            str(v),
            True,
            None,
            [v],
        ],
    )


def _dict_nodes(tree: Any) -> list[dict]:
    """Every dict node of a structure record (iteratively: records may be deep)."""
    out, stack = [], [tree]
    while stack:
        n = stack.pop()
        if type(n) is dict:
            out.append(n)
            stack.extend(v for v in n.values() if type(v) in (dict, list))
        elif type(n) is list:
            stack.extend(v for v in n if type(v) in (dict, list))
    return out


def _mutate_record(r: Any, info: dict) -> str:
    """Edit the tensorkeep structure record (tree, block size, checksums)."""
    kind = _pick(r, ["swap", "kind", "plain", "block", "crc", "version", "deep", "flag", "tag", "drop"])
    nodes = _dict_nodes(info.get("tree"))
    refs = [n for n in nodes if "t" in n or "n" in n]
    if kind == "swap" and len(refs) >= 2:
        a, b = _pick(r, refs), _pick(r, refs)
        ka, kb = ("t" if "t" in a else "n"), ("t" if "t" in b else "n")
        a[ka], b[kb] = b[kb], a[ka]
    elif kind == "kind" and refs:
        n = _pick(r, refs)
        k = "t" if "t" in n else "n"
        n["n" if k == "t" else "t"] = n.pop(k)
    elif kind == "plain":
        node = _pick(r, nodes) if nodes else {}
        for v in node.values():
            if type(v) is list and v:
                i = r.randrange(len(v))
                v[i] = _pick(r, [1, -1, "x", None, True, 2**70, {"f": "nan"}, {"f": "1e400"}, [], {}])
                break
    elif kind == "block":
        info["block"] = _pick(r, [0, 1, -1, 8, 2**63, "16", 16.0, None, info.get("block", 1) * 2])
    elif kind == "crc" and type(info.get("crc")) is dict and info["crc"]:
        name = _pick(r, list(info["crc"]))
        crcs = info["crc"][name]
        choice = r.randrange(4)
        if choice == 0 and crcs:
            c = crcs[0]
            crcs[0] = _pick(r, [c.upper(), c[:7], c + "0", "0" * 8, "zzzzzzzz", 0])
        elif choice == 1:
            crcs.append("00000000")
        elif choice == 2:
            del info["crc"][name]
        else:
            info["crc"][name + "x"] = crcs
    elif kind == "version":
        info["v"] = _pick(r, [0, 2, "1", 1.0, None])
    elif kind == "deep":  # spelled out by json_mutation: json.dumps would recurse too deeply
        info["tree"] = {DEEP: _pick(r, [knobs.MAX_DEPTH - 1, knobs.MAX_DEPTH + 1, 3000])}
    elif kind == "flag" and refs:
        _pick(r, refs)[_pick(r, ["p", "g", "s", "m", "zz"])] = _pick(r, [True, 1, "yes", None])
    elif kind == "tag" and nodes:
        n = _pick(r, nodes)
        n[_pick(r, ["S", "dt", "dev", "f", "zz", "u"])] = _pick(r, [[1, 2], "float32", "cpu", "1.5", "nope", [-1]])
    elif kind == "drop":
        info.pop(_pick(r, ["v", "block", "tree", "crc"]), None)
    return kind


DEEP = "deep-tree"


def _shape_edit(r: Any, shape: list) -> None:
    choice = r.randrange(5)
    if choice == 0 and shape:
        i = r.randrange(len(shape))
        shape[i] = _number(r, shape[i])
    elif choice == 1 and len(shape) >= 2:
        shape.reverse()  # same element count: a legitimately different tensor
    elif choice == 2:
        shape.insert(r.randrange(len(shape) + 1), _pick(r, [1, 0, 2**62, 2**63 - 1]))
    elif choice == 3 and shape:
        del shape[r.randrange(len(shape))]
    else:
        shape[:] = _pick(r, [[], [0], [1] * 65, [0, 2**62, 4], [2**32, 2**32, 0]])


def json_mutation(r: Any, data: bytes) -> tuple[bytearray, str]:
    """Re-encode a seed's header with one semantic edit; the data area is kept as it is."""
    n = header_len(data)
    head = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    names = [k for k in head if k != "__metadata__"]
    kind = _pick(
        r,
        [
            "offset",
            "shape",
            "dtype",
            "swap",
            "drop",
            "rename",
            "field",
            "reorder",
            "meta",
            "duplicate",
            "record",
            "record",
            "record",
        ],
    )
    t = head[_pick(r, names)] if names else None
    if kind == "offset" and t:
        i = r.randrange(2)
        t["data_offsets"][i] = _number(r, t["data_offsets"][i])
    elif kind == "shape" and t:
        _shape_edit(r, t["shape"])
    elif kind == "dtype" and t:
        t["dtype"] = _pick(r, list(ITEMSIZE) + ["F128", "f32", "", 5, None])
    elif kind == "swap" and len(names) >= 2:
        a, b = head[_pick(r, names)], head[_pick(r, names)]
        a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]
    elif kind == "drop" and t:
        del head[_pick(r, names)]
    elif kind == "rename" and t:
        old = _pick(r, names)
        head[_pick(r, [old + "x", "", "__metadata__~", old.upper() + "\u00e9"])] = head.pop(old)
    elif kind == "field" and t:
        if r.randrange(2):
            t[_pick(r, ["extra", "Dtype", ""])] = 1
        else:
            del t[_pick(r, ["dtype", "shape", "data_offsets"])]
    elif kind == "reorder":
        items = [(k, head[k]) for k in names]
        items.sort(key=lambda kv: r.randrange(1 << 30))
        meta = {"__metadata__": head["__metadata__"]} if "__metadata__" in head else {}
        head = {**meta, **dict(items)}
    elif kind == "meta":
        meta = head.setdefault("__metadata__", {})
        choice = r.randrange(4)
        if choice == 0:
            head.pop("__metadata__")
        elif choice == 1 and meta:
            meta[_pick(r, list(meta))] = _pick(r, [1, None, "", ["x"]])
        else:
            meta[_pick(r, ["k", "tensorkeep", "tensorkeep.crc32", "x" * 40])] = _pick(r, ["v", "{}", "0" * 8])
    elif kind == "record" and type(head.get("__metadata__")) is dict and "tensorkeep" in head["__metadata__"]:
        info = json.loads(head["__metadata__"]["tensorkeep"])
        kind = "record-" + _mutate_record(r, info)
        record = json.dumps(info, separators=(",", ":"), ensure_ascii=False)
        if type(info.get("tree")) is dict and DEEP in info["tree"]:
            depth = info["tree"][DEEP]
            record = record.replace(
                json.dumps({DEEP: depth}, separators=(",", ":")), '{"l":[' * depth + "1" + "]}" * depth
            )
        head["__metadata__"]["tensorkeep"] = record
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    if kind == "duplicate":  # json cannot write a duplicate key: splice one in by hand
        dup = json.dumps({names[0]: head[names[0]]} if names else {"k": 1}, separators=(",", ":")).encode()
        text = text[:-1] + (b"," if len(text) > 2 else b"") + dup[1:]
    text += b" " * (_pick(r, [(-len(text)) % 8, 0, 1, 9]))
    return bytearray(struct.pack("<Q", len(text)) + text + body), "json-" + kind


def reseal(b: bytearray) -> bool:
    """Recompute a tensorkeep header checksum after an edit, as a deliberate forger would."""
    n = header_len(b)
    at = 8 + len(TK_PREFIX)
    if n < 0 or 8 + n > len(b) or 8 + n < at + 8 or bytes(b[8:at]) != TK_PREFIX:
        return False
    b[at : at + 8] = b"00000000"
    b[at : at + 8] = b"%08x" % zlib.crc32(b[: 8 + n])
    return True


def make_case(r: Any, seeds: list[Seed]) -> Case:
    """One input: a seed, an optional header-JSON edit, then 0-4 byte-level mutations."""
    s = r.randrange(len(seeds))
    ops: list[str] = []
    if r.randrange(3) == 0:
        b, what = json_mutation(r, seeds[s].data)
        ops.append(what)
        nbyte = _pick(r, [0, 0, 0, 1])
    else:
        b = bytearray(seeds[s].data)
        nbyte = r.randrange(1, 5)
    for _ in range(nbyte):
        op = _pick(r, BYTE_OPS)
        op(r, b, seeds)
        ops.append(op.__name__[2:])
    forged = False
    if seeds[s].is_tk and r.randrange(10) < (8 if ops[0].startswith("json") else 3):
        forged = reseal(b)
    return Case(bytes(b), s, ops, forged)


class ProviderRandom:
    """The two calls ``make_case`` makes on a ``random.Random``, answered from an atheris
    ``FuzzedDataProvider``, so that coverage guidance steers the choice of mutations."""

    def __init__(self, fdp: Any) -> None:
        self.fdp = fdp

    def randrange(self, start: int, stop: int | None = None) -> int:
        lo, hi = (0, start) if stop is None else (start, stop)
        return self.fdp.ConsumeIntInRange(lo, hi - 1)

    def randbytes(self, n: int) -> bytes:
        return self.fdp.ConsumeBytes(n).ljust(n, b"\0")
