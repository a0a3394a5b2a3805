"""Lua scripts, one file each under ``lua/``: the one place that loads them and spells how
they are called (``EVALSHA``, falling back to ``EVAL`` on a server that does not know the
script yet, e.g. after a restart)."""

from __future__ import annotations

import hashlib
from functools import cache
from importlib.resources import files
from typing import Any

from ._core.ops import Script

__all__ = ["eval_instead", "script_command", "script_source"]


@cache
def script_source(name: str) -> str:
    return (files("syncmap") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


@cache
def _sha(name: str) -> str:
    return hashlib.sha1(script_source(name).encode()).hexdigest()


def script_command(op: Script) -> tuple[Any, ...]:
    """The ``EVALSHA`` command of a script operation."""
    return ("EVALSHA", _sha(op.name), len(op.keys), *op.keys, *op.args)


def eval_instead(op: Script, evalsha: tuple[Any, ...]) -> tuple[Any, ...]:
    """The ``EVAL`` command to send when the server answered ``evalsha`` with NOSCRIPT (built
    only then: most commands never need it)."""
    return ("EVAL", script_source(op.name), *evalsha[2:])
