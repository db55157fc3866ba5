"""One way to turn a pydantic ``ValidationError`` into the project's one-line error text.

Every package validates its inputs with pydantic and reports only the first problem, as
``<where>: <message>`` (``where`` is the dotted path of the offending key).  This is the lowest
package, so ``inference``, ``training`` and ``deploy`` share the helper from here.
"""

from __future__ import annotations

from pydantic import ValidationError


def first_error_parts(exc: ValidationError, root: str = "(root)", skip: int = 0) -> tuple[str, str]:
    """``(where, message)`` of the first error; ``skip`` drops leading location parts (the tag
    of a discriminated union, say); ``root`` names a problem of the whole object."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"][skip:]) or root
    return where, str(first["msg"]).removeprefix("Value error, ")


def first_error(exc: ValidationError, root: str = "(root)", skip: int = 0) -> str:
    """The first error as ``where: message`` (one line)."""
    where, message = first_error_parts(exc, root, skip)
    return f"{where}: {message}"
