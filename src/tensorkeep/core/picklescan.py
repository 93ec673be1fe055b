"""The pickle of a torch file, scanned before torch runs it.

``torch.load(weights_only=True)`` restricts what a pickle may call, but still builds whatever the
opcodes say: a dict key that is a tuple nested 200,000 deep makes ``hash()`` recurse in C until
the process dies, a few hundred bytes of shared tuples make hashing exponential, a codec name
imports a module, a size read from the file allocates what it says. :func:`check_pickle` walks the
opcodes first and builds and calls nothing; it refuses what torch's unpickler would do harm with.
"""

from __future__ import annotations

import _compat_pickle
import codecs
from typing import Any

from tensorkeep import knobs
from tensorkeep.errors import FormatError, LimitError

_KEY, _OTHER, _DICT = "key", "other", "dict"  # a safe dict key (small int, bool, None); anything else; a dict
_ARG = {0x4A: 4, 0x4B: 1, 0x4D: 2, 0x47: 8, 0x80: 1}  # BININT, BININT1, BININT2, BINFLOAT, PROTO: fixed arguments
_HASHING = {"builtins.set", "collections.Counter", "collections.OrderedDict"}  # called with items, they hash them
_FROM_TYPE = "torch._tensor._rebuild_from_type_v2"  # calls its first argument with its third
_BYTES = ("r", "_codecs.encode")  # what that call returns: how protocol 2 writes bytes, _codecs.encode(str, "latin1")
_DICTS = {_DICT, ("r", "collections.OrderedDict"), ("r", "collections.Counter")}  # keys checked as they were set
_TAKES = {
    "_codecs.encode": "a string and 'latin1' (another encoding would import its codec's module)",
    "builtins.bytearray": "bytes, or a string and 'latin-1' (a number would be allocated as that many bytes)",
    "torch.serialization._get_layout": "a layout's name (it is looked up in a dict)",
}
_MAX_KEY_INT = (1 << 61) - 2  # ints up to this hash to themselves (but -1, to -2: one pair, harmless)
codecs.lookup("latin1")  # now, not when a file's bytes are first decoded: a file never causes an import


def _is_key(v: Any) -> bool:
    """A value whose hash the file cannot choose: a str or bytes (hashes are salted), a small int, a bool, None."""
    return v is _KEY or v == _BYTES or (type(v) is tuple and v[0] == "s")


def _safe_items(v: Any) -> bool:
    """``v``'s items are safe to hash: a dict's keys (checked as it was filled), a list or tuple of keys."""
    if type(v) is list:
        return v[1]
    if type(v) is tuple and v[0] == "t":
        return all(_is_key(x) for x in v[1])
    return v in _DICTS  # what is left is hashable: a constant, ("g" | "r" | "s", text)


def _updatable(v: Any) -> bool:
    """``dict.update(v)``, or of each part of a tuple ``v``, would hash only safe keys (what BUILD does)."""
    if type(v) is list:
        return v[1]
    if type(v) is not tuple or v[0] != "t":
        return True
    return all(
        x[1] if type(x) is list else not (type(x) is tuple and x[0] == "t" and x[1] and not _is_key(x[1][0]))
        for x in v[1]
    )


def _is_str(v: Any, text: str | None = None) -> bool:
    return type(v) is tuple and v[0] == "s" and (text is None or v[1] == text)


def _call(where: str, func: Any, args: Any) -> None:
    """Refuse a call that would hash values whose hash the file controls (set, Counter, OrderedDict of
    items), or look up a codec (a module import) or allocate by a number from the file (bytearray)."""
    name = func[1] if type(func) is tuple and func[0] == "g" else None
    items = args[1] if type(args) is tuple and args[0] == "t" else None
    while name == _FROM_TYPE and items is not None and len(items) >= 3:
        func, args = items[0], items[2]  # _rebuild_from_type_v2(func, type, args, state) calls func(*args)
        name = func[1] if type(func) is tuple and func[0] == "g" else None
        items = args[1] if type(args) is tuple and args[0] == "t" else None
    if name is not None and name.startswith("torch.") and name.endswith(("Tensor", "Storage")):
        raise FormatError(
            f"{where}: the pickle calls {name} itself, which allocates whatever size the file asks "
            "for; torch.save never does (its tensors are rebuilt from the archive's storages)"
        )
    if name in _HASHING and not (items is not None and (not items or (len(items) == 1 and _safe_items(items[0])))):
        raise FormatError(
            f"{where}: the pickle builds a {name} of tuples, floats or other values whose hash the "
            "file controls (a few bytes can make hashing them take hours or crash); tensorkeep reads "
            "sets and dicts keyed by str, int, bool and None only"
        )
    if name == "_codecs.encode":
        ok = items is not None and len(items) == 2 and _is_str(items[0]) and _is_str(items[1], "latin1")
    elif name == "torch.serialization._get_layout":  # looks its argument up in a dict
        ok = items is not None and len(items) == 1 and _is_str(items[0])
    elif name == "builtins.bytearray":
        ok = items is not None and (
            items in ((), (_BYTES,)) or (len(items) == 2 and _is_str(items[0]) and _is_str(items[1], "latin-1"))
        )
    else:
        return
    if not ok:
        raise FormatError(
            f"{where}: the pickle calls {name} with arguments torch.save never writes; it takes {_TAKES[name]}"
        )


def _key(where: str, k: Any) -> None:
    if not _is_key(k):
        raise FormatError(
            f"{where}: the pickle has a dict key that is not a str, an int, a bool or None (a "
            "tuple, a float, a huge int: a few bytes of such keys can make hashing them take hours "
            "or crash); tensorkeep reads dicts keyed by those only"
        )


def check_pickle(where: str, data: Any, at: int = 0) -> int:
    r"""Scan the pickle at ``at`` in ``data`` (bytes or a mapping) as torch's weights-only unpickler
    would run it, and refuse (:class:`FormatError`) what would make that unpickler hash values whose
    hash the file controls: a dict key or set item that is a tuple (a tuple nested 200,000 deep
    crashes ``hash``; one shared 2**100 ways hashes for ever), a float or a huge int (keys that all
    collide make inserting them quadratic); encode with a codec other than the one torch.save uses
    (looking one up imports a module); make a bytearray of a size the file gives; or run an opcode
    that unpickler does not run. Returns where the pickle ends. Nothing is built or called; at most
    2 * ``knobs.MAX_JSON_VALUES`` opcodes are read (a .pt file has about 30 per tensor).

    >>> check_pickle("x.pkl", b"\x80\x02}X\x01\x00\x00\x00wK\x01s.")
    13
    """
    stack: list[Any] = []
    marks: list[list[Any]] = []
    memo: dict[int, Any] = {}
    pos, budget = at, 2 * knobs.MAX_JSON_VALUES
    try:
        while True:
            op = data[pos]
            pos += 1
            budget -= 1
            if budget < 0:  # each opcode makes an object here (and in torch): bound the memory
                raise LimitError(
                    f"{where}: the pickle has more than {2 * knobs.MAX_JSON_VALUES} opcodes (about 30 "
                    "per tensor); raise tensorkeep.knobs.MAX_JSON_VALUES to read it"
                )
            if op in (0x71, 0x72, 0x68, 0x6A):  # BINPUT, LONG_BINPUT, BINGET, LONG_BINGET
                w = 1 if op in (0x71, 0x68) else 4
                i = int.from_bytes(data[pos : pos + w], "little")
                pos += w
                if op < 0x70:
                    stack.append(memo[i])
                else:
                    memo[i] = stack[-1]
            elif op in (0x58, 0x55):  # BINUNICODE, SHORT_BINSTRING: ("s", the text if short)
                w = 4 if op == 0x58 else 1
                n = int.from_bytes(data[pos : pos + w], "little")
                text = bytes(data[pos + w : pos + w + n]).decode("utf-8", "replace") if n <= 16 else None
                pos += w + n
                stack.append(("s", text))
            elif op in _ARG:
                pos += _ARG[op]
                if op != 0x80:
                    stack.append(_OTHER if op == 0x47 else _KEY)
            elif op == 0x8A:  # LONG1
                n = data[pos]
                v = int.from_bytes(data[pos + 1 : pos + 1 + n], "little", signed=True)
                pos += 1 + n
                stack.append(_KEY if abs(v) <= _MAX_KEY_INT else _OTHER)
            elif op in (0x4E, 0x88, 0x89):  # NONE, NEWTRUE, NEWFALSE
                stack.append(_KEY)
            elif op == 0x28:  # MARK
                marks.append(stack)
                stack = []
            elif op in (0x74, 0x65, 0x75):  # TUPLE, APPENDS, SETITEMS: the items since the mark
                items, stack = stack, marks.pop()
                if op == 0x74:
                    stack.append(("t", tuple(items)))
                elif op == 0x65:
                    if type(stack[-1]) is list:
                        stack[-1][1] = stack[-1][1] and all(_is_key(x) for x in items)
                else:
                    for k in items[::2]:
                        _key(where, k)
            elif op in (0x85, 0x86, 0x87):  # TUPLE1, TUPLE2, TUPLE3
                n = op - 0x84
                items = stack[-n:]
                if len(items) != n:
                    raise IndexError
                del stack[-n:]
                stack.append(("t", tuple(items)))
            elif op == 0x29:  # EMPTY_TUPLE
                stack.append(("t", ()))
            elif op == 0x5D:  # EMPTY_LIST: [tag, whether every item is a safe key]
                stack.append(["l", True])
            elif op in (0x7D, 0x8F):  # EMPTY_DICT, EMPTY_SET (never filled: no ADDITEMS)
                stack.append(_DICT if op == 0x7D else _OTHER)
            elif op == 0x61:  # APPEND
                item = stack.pop()
                if type(stack[-1]) is list:
                    stack[-1][1] = stack[-1][1] and _is_key(item)
            elif op == 0x73:  # SETITEM
                stack.pop()
                _key(where, stack.pop())
            elif op == 0x63:  # GLOBAL: module and name, a line each
                e1 = data.find(b"\n", pos)
                e2 = data.find(b"\n", e1 + 1)
                if e1 < 0 or e2 < 0:
                    raise IndexError
                module, name = (
                    bytes(data[pos:e1]).decode("utf-8", "replace"),
                    bytes(data[e1 + 1 : e2]).decode("utf-8", "replace"),
                )
                pos = e2 + 1
                if (module, name) in _compat_pickle.NAME_MAPPING:  # as torch maps protocol 2's names
                    module, name = _compat_pickle.NAME_MAPPING[(module, name)]
                else:
                    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
                stack.append(("g", f"{module}.{name}"))
            elif op in (0x52, 0x81):  # REDUCE, NEWOBJ (cls.__new__ only: it fills nothing)
                args = stack.pop()
                func = stack.pop()
                _call(where, func, args if op == 0x52 else ("t", ()))  # NEWOBJ: cls.__new__ fills nothing
                stack.append(("r", func[1]) if op == 0x52 and type(func) is tuple and func[0] == "g" else _OTHER)
            elif op == 0x62:  # BUILD: dict.update of the object under it with the state (a dict, or pairs)
                if not _updatable(stack.pop()) or not stack:
                    raise FormatError(
                        f"{where}: the pickle sets an object's state from pairs whose keys are not "
                        "str, int, bool or None"
                    )
            elif op == 0x51:  # BINPERSID: torch looks up a storage by the key in its id, ("storage", type, key, ...)
                pid = stack.pop()
                ids: tuple[Any, ...] = pid[1] if type(pid) is tuple and pid[0] == "t" else ()
                view: tuple[Any, ...] = ids[5][1] if len(ids) > 5 and type(ids[5]) is tuple and ids[5][0] == "t" else ()
                if (len(ids) > 2 and not _is_key(ids[2])) or (view and not _is_key(view[0])):
                    raise FormatError(f"{where}: the pickle names a storage by a key that is not a str or an int")
                stack.append(_OTHER)
            elif op == 0x2E:  # STOP
                return pos
            else:
                raise FormatError(
                    f"{where}: the pickle has opcode {op:#04x} at byte {pos - 1 - at}, which "
                    "torch's weights-only loader does not run (torch.save never writes it)"
                )
    except (IndexError, KeyError):
        raise FormatError(
            f"{where}: the pickle is malformed near byte {pos - at} (the file is damaged, or was "
            "not written by torch.save)"
        ) from None
