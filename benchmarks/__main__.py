"""Run every benchmark: ``python -m benchmarks [--quick] [NAME ...]``.

Each ``bench_<name>.py`` has ``main() -> None`` that prints its Markdown table(s).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    wanted = [a for a in sys.argv[1:] if not a.startswith("-")]
    here = Path(__file__).resolve().parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    for name in names:
        if wanted and name.removeprefix("bench_") not in wanted:
            continue
        importlib.import_module(f"benchmarks.{name}").main()


if __name__ == "__main__":
    main()
