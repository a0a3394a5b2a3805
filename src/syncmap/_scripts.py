"""Lua scripts, one file each under ``lua/``, loaded once per process."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

__all__ = ["script_source"]


@cache
def script_source(name: str) -> str:
    return (files("syncmap") / "lua" / f"{name}.lua").read_text(encoding="utf-8")
