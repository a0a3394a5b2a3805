"""Generate the blocking code of syncmap from its asyncio code (the asyncio code is written once).

In a module, an asyncio block is marked::

    # unasync: source NAME
    ...asyncio code...
    # unasync: end

and the blocking code made from it sits elsewhere in the same module, between::

    # unasync: generated NAME (from the asyncio code by scripts/unasync.py: do not edit)
    ...
    # unasync: end

The blocking code is the asyncio code with tokens substituted (``async def`` -> ``def``,
``await x`` -> ``x``, ``AsyncX`` -> ``X``, ...: :data:`TOKENS`), after the module's explicit
text replacements (:data:`TEXTS`: a docstring that says something else in the blocking form).
A source line ending with ``# unasync: drop`` has no blocking counterpart, nor have the lines
between ``# unasync: drop begin`` and ``# unasync: drop end``. The module is then
formatted with ruff (the generated lines are shorter, and may join).

    python scripts/unasync.py          # rewrite the generated blocks
    python scripts/unasync.py --check  # exit 1 (with a diff) if one is stale
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "syncmap"
MODULES = ["_cluster.py", "_driver.py", "_lock.py", "_map.py", "_node.py"]

# Token substitutions, in order, on whole words.
TOKENS: list[tuple[str, str]] = [
    (r"\basync def\b", "def"),
    (r"\basync with\b", "with"),
    (r"\basync for\b", "for"),
    (r"\bawait ", ""),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\.aclose\(", ".close("),
    (r"\basyncio\.sleep\(", "time.sleep("),
    (r"\basyncio\.Event\b", "threading.Event"),
    (r"\basyncio\.to_thread\(\s*([\w.]+)\s*\)", r"\1()"),  # (blocking: called in place)
    (r"\basyncio\.to_thread\(\s*([\w.]+),\s*", r"\1("),
    (r"\bconnect_async\b", "connect"),
    (r"\bredis\.asyncio\.", "redis."),
    (r"\bAsyncIterator\b", "Iterator"),
    (r"\bAsyncSyncMap\b", "SyncMap"),
    (r"\bAsyncDriver\b", "SyncDriver"),
    (r"\bAsyncListener\b", "SyncListener"),
    (r"\b_AsyncRedirecting\b", "_SyncRedirecting"),
    (r"\basync_pool\b", "sync_pool"),
    (r"\b_Async([A-Z]\w*)", r"_\1"),
    (r"\bAsync([A-Z]\w*)", r"\1"),
    (r"\bobtain_async\b", "obtain"),
    (r"\bobtain_multi_async\b", "obtain_multi"),
]

# Per module: exact texts of the asyncio code and what the blocking code says instead
# (docstrings). Every one must be found: a text that no longer matches is an error.
TEXTS: dict[str, list[tuple[str, str]]] = {
    "_lock.py": [
        (
            '    """The asyncio form of :class:`Lock`: ``await lock.acquire()``, '
            '``async with lock:``."""',
            '    """A distributed lock with ``threading.Lock``\'s protocol '
            "(``acquire``/``release``/``with``).\n\n"
            "    Make one with ``node.lock(name, ttl=30.0, ...)``; ``node.obtain(name, ttl)`` "
            "returns one\n"
            "    already held. Options: ``metadata`` (stored after the token, as redislock "
            "does),\n"
            "    ``poll_interval`` (fallback poll while queued; wake-ups are pushed on "
            "release),\n"
            "    ``auto_renew``/``max_hold``/``on_lost`` (watchdog).\n"
            '    """',
        ),
        (
            '    """The asyncio form of :func:`obtain`."""',
            '    """redislock\'s Obtain: a held :class:`Lock`, or :class:`NotObtained`."""',
        ),
        (
            '    """The asyncio form of :func:`obtain_multi`."""',
            '    """Obtain every key or none (all in one hash slot, e.g. ``{order:42}:a``)."""',
        ),
    ],
    "_node.py": [
        (
            '    """Connect an asyncio node to the server at ``url`` (or ``$SYNCMAP_URL``, or the '
            "embedded\n    Valkey, found in a thread).",
            '    """Connect to the server at ``url`` (or ``$SYNCMAP_URL``, or the embedded '
            "Valkey).",
        ),
        (
            '    """An asyncio connection to the server. Make one with :func:`connect_async`."""',
            '    """A blocking connection to the server. Make one with :func:`connect`."""',
        ),
        (
            '        """A distributed lock named ``name`` for asyncio; not yet acquired."""',
            '        """A distributed lock named ``name`` (see :class:`syncmap.Lock`); '
            'not yet acquired."""',
        ),
        (
            '        """The shared map ``name`` for asyncio, started (subscribed) before it is '
            'returned."""',
            '        """The shared map ``name``, with a local copy in this process '
            '(see :class:`SyncMap`)."""',
        ),
    ],
    "_map.py": [
        (
            '        """As :meth:`SyncMap.watch`: ``async for change in m.watch(timeout=...)``."""',
            '        """Yield the map\'s changes as this node\'s listener receives them, for '
            "``timeout``\n"
            "        seconds (``None``: until the caller stops). Best effort: a change lost on "
            "the way is\n"
            '        not replayed (the local copy is still dropped: contract §4); a "set" '
            "carries the\n"
            '        value read when the change is yielded."""',
        ),
        (
            '        """As :meth:`SyncMap.get_or_load`; ``loader`` may be a coroutine function."""',
            '        """The value of ``key``; if absent, ``loader()`` runs on exactly one node '
            "and its\n"
            '        result is stored (``ttl``) and returned to every waiting node."""',
        ),
    ],
    "_driver.py": [
        (
            '    """The asyncio twin of :class:`SyncDriver` (same connection handling, '
            'awaited)."""',
            '    """Runs flows in the calling thread. ``sleep`` replaces ``Sleep`` (e.g. a '
            "watchdog waits\n"
            '    on an event that a release sets)."""',
        ),
    ],
    "_cluster.py": [
        (
            '    """Mixin for a redis-py asyncio ``Connection`` class '
            '(see the module docstring)."""',
            '    """Mixin for a redis-py ``Connection`` class (see the module docstring)."""',
        ),
    ],
}

_SOURCE = re.compile(r"^(?P<indent>[ ]*)# unasync: source (?P<name>\S+)\s*$")
_GENERATED = re.compile(r"^(?P<indent>[ ]*)# unasync: generated (?P<name>\S+)\b.*$")
_END = re.compile(r"^[ ]*# unasync: end\s*$")
_DROP = "# unasync: drop"


def _blocks(lines: list[str], start: re.Pattern[str]) -> dict[str, tuple[int, int, str]]:
    """NAME -> (first line inside, the end marker's line, indent) of each marked block."""
    found: dict[str, tuple[int, int, str]] = {}
    for i, line in enumerate(lines):
        match = start.match(line)
        if match is None:
            continue
        end = next((j for j in range(i + 1, len(lines)) if _END.match(lines[j])), None)
        if end is None:
            raise SystemExit(f"unasync: block {match['name']!r} has no '# unasync: end'")
        found[match["name"]] = (i + 1, end, match["indent"])
    return found


def _reindent(lines: list[str], old: str, new: str) -> list[str]:
    out = []
    for line in lines:
        if line.strip() and not line.startswith(old):
            raise SystemExit(f"unasync: line less indented than its block marker: {line!r}")
        out.append(new + line[len(old) :] if line.strip() else "")
    return out


def unasync(text: str, replacements: list[tuple[str, str]]) -> str:
    """The blocking form of one block of asyncio code."""
    for old, new in replacements:
        text = text.replace(old, new)
    lines, dropping = [], False
    for line in text.split("\n"):
        mark = line.strip()
        if mark in (_DROP + " begin", _DROP + " end"):
            dropping = mark.endswith("begin")
        elif not dropping and not line.rstrip().endswith(_DROP):
            lines.append(line)
    text = "\n".join(lines)
    for pattern, repl in TOKENS:
        text = re.sub(pattern, repl, text)
    return text


def _ruff() -> str:
    beside = Path(sys.executable).parent / "ruff"
    found = str(beside) if beside.exists() else shutil.which("ruff")
    if found is None:
        raise SystemExit("unasync: ruff not found (run it from the project's venv)")
    return found


def _format(path: Path, text: str) -> str:
    done = subprocess.run(
        [_ruff(), "format", "--stdin-filename", str(path), "-"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"unasync: ruff format failed on {path}:\n{done.stderr}")
    return done.stdout


def generate(path: Path) -> str:
    """The module's text with its generated blocks made anew from its asyncio blocks."""
    text = path.read_text()
    lines = text.split("\n")
    sources = _blocks(lines, _SOURCE)
    targets = _blocks(lines, _GENERATED)
    if set(sources) != set(targets):
        raise SystemExit(
            f"unasync: {path.name}: source blocks {sorted(sources)} but generated blocks "
            f"{sorted(targets)}"
        )
    replacements = TEXTS.get(path.name, []) if sources else []
    for old, _ in replacements:
        if not any(old in "\n".join(lines[a:b]) for a, b, _ in sources.values()):
            raise SystemExit(f"unasync: {path.name}: replacement text not found: {old!r}")
    made = {}
    for name, (first, end, indent) in sources.items():
        made[name] = (unasync("\n".join(lines[first:end]), replacements).split("\n"), indent)
    # replaced from the bottom up, so that earlier line numbers hold
    for name, (first, end, indent) in sorted(targets.items(), key=lambda t: -t[1][0]):
        body, source_indent = made[name]
        lines[first:end] = _reindent(body, source_indent, indent)
    return _format(path, "\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args()
    stale = 0
    for name in MODULES:
        path = PACKAGE / name
        old, new = path.read_text(), generate(path)
        if old == new:
            continue
        if args.check:
            stale += 1
            rel = str(path.relative_to(ROOT))
            sys.stdout.writelines(
                difflib.unified_diff(
                    old.splitlines(True), new.splitlines(True), rel, rel + " (generated)"
                )
            )
        else:
            path.write_text(new)
            print(f"unasync: rewrote {path.relative_to(ROOT)}")
    if stale:
        print(
            f"unasync: {stale} module(s) stale: run `python scripts/unasync.py` "
            "(edit the asyncio code, not the generated one)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
