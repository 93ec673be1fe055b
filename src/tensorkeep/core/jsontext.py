"""JSON as tensorkeep reads and writes it: strict (no duplicate keys, no NaN, bounded nesting and
size), compact, and sealed with its own CRC-32 (manifests, ``distributed.json``).

>>> unseal(seal(dumps({"a": 1})), "x")["a"]
1
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from tensorkeep import knobs
from tensorkeep.core.crc import crc32
from tensorkeep.errors import ChecksumError, FormatError, LimitError


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        keys = [k for k, _ in pairs]
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup!r}")
    return out


def strict_json(text: str | bytes, where: str) -> Any:
    """Parse JSON refusing duplicate keys, NaN/Infinity and runaway nesting.

    >>> strict_json('{"a": 1}', "x")
    {'a': 1}
    """
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except RecursionError:
        raise FormatError(f"{where}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{where}: not valid JSON ({e})") from None


def json_values(text: bytes) -> int:
    """An upper bound on the values and keys ``json.loads(text)`` builds: each one but the first
    follows a ``,`` ``:`` ``[`` or ``{`` outside a string.

    >>> json_values(b'{"a": [1, 2], "b": "x"}')  # the dict, 2 keys, the list, 1, 2, "x"
    7
    """
    n = text.count(b",") + text.count(b":") + text.count(b"[") + text.count(b"{") + 1
    if n <= knobs.MAX_JSON_VALUES:
        return n
    # That count included what is inside strings: count again without them. Drop escaped
    # backslashes, then escaped quotes, and every '"' left opens or closes a string. In chunks,
    # with NumPy, so that counting a 100 MB header costs ~50 MB and well under a second.
    bare = np.frombuffer(text.replace(b"\\\\", b"").replace(b'\\"', b""), np.uint8)
    n, inside = 1, 0
    for at in range(0, len(bare), 4 << 20):
        c = bare[at : at + (4 << 20)]
        quotes = np.cumsum(c == ord('"'), dtype=np.uint8)  # wraps at 256; only its parity is used
        outside = ((quotes + inside) & 1) == 0
        n += int(np.count_nonzero(outside & ((c == ord(",")) | (c == ord(":")) | (c == ord("[")) | (c == ord("{")))))
        inside = (inside + int(quotes[-1])) & 1
    return n


def check_json_values(text: bytes, what: str) -> None:
    """Refuse JSON that would build more than ``knobs.MAX_JSON_VALUES`` Python objects."""
    n = json_values(text)
    if n > knobs.MAX_JSON_VALUES:
        raise LimitError(
            f"{what} holds {n} JSON values, more than the limit of {knobs.MAX_JSON_VALUES} "
            "(tensorkeep.knobs.MAX_JSON_VALUES; raise it to read this file)"
        )


def dumps(obj: Any) -> str:
    """Compact JSON as tensorkeep writes it (NaN refused, Unicode kept)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


#: A sealed JSON document (a checkpoint manifest, ``distributed.json``) starts with its own CRC-32:
#: ``{"crc32":"1a2b3c4d",...}``, computed over the bytes with those 8 digits as zeros.
SEAL_PREFIX = b'{"crc32":"'
_SEAL_END = len(SEAL_PREFIX) + 8


def seal(text: str) -> bytes:
    """``text`` (a JSON object, as :func:`dumps` writes it) with its CRC-32 in front.

    >>> seal('{"a":1}')
    b'{"crc32":"fa3f1321","a":1}'
    >>> unseal(seal('{"a":1}'), "x")
    {'crc32': 'fa3f1321', 'a': 1}
    """
    assert text.startswith("{")
    body = b'{"crc32":"00000000"' + (b"," if text != "{}" else b"") + text[1:].encode("utf-8")
    return body[: len(SEAL_PREFIX)] + f"{crc32(body):08x}".encode() + body[_SEAL_END:]


def unseal(raw: bytes, where: str) -> Any:
    """Parse a JSON document, checking its CRC-32 when it carries one (or carried one before a bit of
    its prefix flipped); documents written before sealing existed have none and parse as before.
    :class:`ChecksumError` when the bytes are not those that were written."""
    head = bytes(raw[: len(SEAL_PREFIX)])
    if len(head) == len(SEAL_PREFIX) and bit_distance(head, SEAL_PREFIX) <= 1:
        zeroed = bytearray(raw)
        zeroed[len(SEAL_PREFIX) : _SEAL_END] = b"00000000"
        stored = bytes(raw[len(SEAL_PREFIX) : _SEAL_END]).decode("ascii", "replace")
        if head != SEAL_PREFIX or stored != f"{crc32(zeroed):08x}":
            raise ChecksumError(
                f"{where}: its checksum does not match its contents (stored {stored!r}): the file "
                "is damaged, not the one that was written"
            )
    return strict_json(raw, where)


def bit_distance(a: bytes, b: bytes) -> int:
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b)) + 8 * abs(len(a) - len(b))
