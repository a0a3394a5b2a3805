"""scripts/unasync.py: the blocking code generated from the asyncio code, and its staleness check
(``make test`` runs ``scripts/unasync.py --check`` before the suite; this runs it too)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "unasync.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unasync_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MODULE = '''\
"""A module."""

import asyncio
import time


class _AsyncShell:
    async def _pause(self) -> None:
        await asyncio.sleep(0)


class _Shell:
    def _pause(self) -> None:
        time.sleep(0)


# unasync: source thing
class AsyncThing(_AsyncShell):
    """An asyncio thing."""

    async def work(self, n: int) -> int:
        self._check()  # unasync: drop
        await self._pause()
        async with self._guard():
            return n

    async def __aenter__(self) -> AsyncThing:
        return self


# unasync: end


# unasync: generated thing (from the asyncio code by scripts/unasync.py: do not edit)
# unasync: end
'''

GENERATED = '''\
# unasync: generated thing (from the asyncio code by scripts/unasync.py: do not edit)
class Thing(_Shell):
    """An asyncio thing."""

    def work(self, n: int) -> int:
        self._pause()
        with self._guard():
            return n

    def __enter__(self) -> Thing:
        return self


# unasync: end
'''


def test_generates_the_blocking_block_from_the_asyncio_one(tmp_path: Path) -> None:
    path = tmp_path / "_thing.py"
    path.write_text(MODULE)
    made = _script().generate(path)
    assert made.endswith(GENERATED)
    assert made.startswith(MODULE[: MODULE.index("# unasync: generated")])
    path.write_text(made)
    assert _script().generate(path) == made  # stable: a second run changes nothing


def test_a_block_without_its_pair_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "_thing.py"
    path.write_text(MODULE[: MODULE.index("# unasync: generated")])
    with pytest.raises(SystemExit, match="source blocks"):
        _script().generate(path)


def test_the_generated_code_is_current() -> None:
    """What make test checks first: an edit of the asyncio code needs the script run again,
    and an edit of the generated code is undone by it."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_work_run_in_a_thread_is_called_in_place_and_events_are_threading_ones() -> None:
    source = (
        "async def start(self) -> None:\n"
        "    self.running = asyncio.Event()\n"
        "    await asyncio.to_thread(router.refresh)\n"
        "    found = await asyncio.to_thread(_prepare, url, redis.asyncio.Redis, options)\n"
        "    node = await connect_async(url)\n"
    )
    assert _script().unasync(source, []) == (
        "def start(self) -> None:\n"
        "    self.running = threading.Event()\n"
        "    router.refresh()\n"
        "    found = _prepare(url, redis.Redis, options)\n"
        "    node = connect(url)\n"
    )
