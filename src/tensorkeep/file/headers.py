"""Parsed headers of local files, kept for the next ``open()`` of the same, unchanged file.

Opening a file parses and validates its JSON header (~1 ms for GPT-2's 148 tensors): more than
reading one small tensor. A process that opens the same file again (``tk.open(p).get(name)`` in
a loop, an evaluation script reading layer by layer) gets the parsed header from here instead.

The key is what the kernel changes whenever a file's bytes may have changed: device, inode, size,
mtime and ctime. A file that tensorkeep replaces gets a new inode; one written in place gets a new
ctime, which no user can set back. ctime ticks coarsely (a few ms on ext4), so a header is kept
only when its file's ctime was :data:`SETTLE_SECONDS` old already before the file was looked at,
and the file still has the same identity after its header was parsed: a later change then lands
in a later tick and so under another key. Only tensorkeep files are kept: tensor bytes are still
checked against the cached block checksums on every read, so the cache skips re-reading the
header, never a check of the data (a network file system whose server clock lags this machine's
can defeat the tick argument; a changed tensor then still fails its checksum). ``tk.verify``
bypasses the cache (it checks the bytes on disk now).

>>> get(None) is None
True
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

#: entries kept (least recently used dropped first), the largest header kept and all of them together,
#: in bytes of header text (parsed, a header takes several times its text in memory)
MAX_ENTRIES = 64
MAX_HEADER_BYTES = 1 << 20
MAX_TOTAL_BYTES = 4 << 20
#: a header is kept only once its file has not changed for this long (see the module's docstring)
SETTLE_SECONDS = 1.0

_lock = threading.Lock()
_cache: OrderedDict[tuple[int, ...], tuple[int, Any]] = OrderedDict()  # identity -> (header bytes, parsed)
_total = 0


def get(identity: tuple[int, ...] | None) -> Any:
    """What :func:`put` kept for a file with this identity, or None."""
    if identity is None:
        return None
    with _lock:
        hit = _cache.get(identity)
        if hit is None:
            return None
        _cache.move_to_end(identity)
        return hit[1]


def put(
    identity: tuple[int, ...] | None, seen_ns: int, now: tuple[int, ...] | None, header_bytes: int, parsed: Any
) -> None:
    """Keep ``parsed`` (immutable from here on) for the file of ``identity``, taken at ``seen_ns``
    (the clock read just before that ``fstat``), if the file had settled by then and ``now`` (its
    identity after the header was parsed) is still the same."""
    if identity is None or now != identity or header_bytes > MAX_HEADER_BYTES:
        return
    if seen_ns - identity[4] < SETTLE_SECONDS * 1e9:
        return
    global _total
    with _lock:
        if identity not in _cache:
            _cache[identity] = (header_bytes, parsed)
            _total += header_bytes
        _cache.move_to_end(identity)
        while len(_cache) > MAX_ENTRIES or _total > MAX_TOTAL_BYTES:
            _total -= _cache.popitem(last=False)[1][0]


def _forget_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_forget_in_child)


def clear() -> None:
    """Forget every cached header."""
    global _total
    with _lock:
        _cache.clear()
        _total = 0
