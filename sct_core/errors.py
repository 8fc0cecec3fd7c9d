"""The root of every error the product raises on purpose.

A technologist, IT or a robot vendor acts on an error only if it says what is wrong where: so every product
error carries the same three fields, ``attribute`` (the DICOM keyword, configuration key, wire field, file or
setting concerned), ``found`` (the value found) and ``expected`` (what was required), and its message is built
from them. Code that must stay up catches :class:`SctError` and reports those fields; code that must stop (a
configuration the agent cannot start with) lets it through to the exit status. Each subclass also keeps the
built-in base it always had (``ValueError``, ``RuntimeError``, ``OSError``) so that callers catching those keep
working.
"""

from __future__ import annotations


class SctError(Exception):
    """An error the product raises on purpose, naming the attribute, the value found and the value expected.

    ``found`` is ``None`` and ``expected`` empty where an error has no single value to show (a C-STORE that
    failed on several instances, a journal that cannot be opened); ``attribute`` is never empty.
    """

    def __init__(self, message: str, *, attribute: str, found: object = None, expected: str = "") -> None:
        super().__init__(message)
        self.attribute = attribute
        self.found = found
        self.expected = expected
