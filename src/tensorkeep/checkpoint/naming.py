"""How things in a run directory are named: checkpoint directories (:class:`Naming`) and the plain
file names a manifest may list (:func:`plain_name`)."""

from __future__ import annotations

import re
import string

from tensorkeep.storage import local as _io

__all__ = ["DEFAULT", "DEFAULT_NAMING", "Naming", "plain_name"]

DEFAULT_NAMING = "step_{step:08d}"


def plain_name(name: object) -> bool:
    """A name that stays inside its directory: no separator, no NUL or other control character, not
    ``.`` / ``..``, at most 255 bytes.

    >>> plain_name("model.tk"), plain_name("../x"), plain_name("a\\x00b"), plain_name("..")
    (True, False, False, False)
    """
    return (
        type(name) is str
        and 0 < len(name) <= 255
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and not any(ord(c) < 32 or ord(c) == 127 for c in name)
        and len(name.encode("utf-8", "surrogatepass")) <= 255
    )


class Naming:
    """How the step directories of a run are named: a format with one ``{step}`` field.

    >>> n = Naming("checkpoint-{step}")
    >>> n.name(7), n.step_of("checkpoint-7"), n.step_of("checkpoint-07"), n.step_of("checkpoint-x")
    ('checkpoint-7', 7, None, None)
    >>> Naming().name(5), Naming().step_of("step_00000005")
    ('step_00000005', 5)
    """

    def __init__(self, fmt: str = DEFAULT_NAMING) -> None:
        try:
            parts = list(string.Formatter().parse(fmt))
        except ValueError as e:
            raise ValueError(f"naming={fmt!r} is not a format string: {e}") from None
        fields = [(f, spec, conv) for _, f, spec, conv in parts if f is not None]
        width = re.fullmatch(r"(0?(\d*))d?", fields[0][1] or "") if len(fields) == 1 else None
        if len(fields) != 1 or fields[0][0] != "step" or fields[0][2] or width is None:
            raise ValueError(
                f"naming={fmt!r}: it needs exactly one field '{{step}}' (optionally with a width such "
                "as '{step:08d}'), e.g. 'step_{step:08d}', 'checkpoint-{step}'"
            )
        digits = rf"(\d{{{int(width.group(2))},}})" if width.group(1).startswith("0") and width.group(2) else r"(\d+)"
        self.fmt = fmt
        self._re = re.compile("".join(re.escape(lit) + (digits if f is not None else "") for lit, f, _, _ in parts))
        sample = self.name(0)
        if not plain_name(sample) or sample.startswith(".") or _io.TMP_MARK in sample:
            raise ValueError(f"naming={fmt!r} gives {sample!r}: not a plain, visible directory name")

    def name(self, step: int) -> str:
        return self.fmt.format(step=step)

    def number(self, name: str) -> int | None:
        """The number in a name shaped like a checkpoint's (``step_000000007`` too, whose canonical
        name has 8 digits); None for any other name."""
        m = self._re.fullmatch(name)
        return int(m.group(1)) if m else None

    def step_of(self, name: str) -> int | None:
        """The step of a checkpoint's directory name; None unless it is exactly ``name(step)``."""
        m = self._re.fullmatch(name)
        return int(m.group(1)) if m and self.name(int(m.group(1))) == name else None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Naming) and other.fmt == self.fmt

    def __hash__(self) -> int:
        return hash(self.fmt)

    def __repr__(self) -> str:
        return f"Naming({self.fmt!r})"


DEFAULT = Naming()
