"""gunicorn configuration for tests/test_prefork.py: when gunicorn stops, the master (which
preloaded tests/prefork_app.py) reads the map and writes its report (``on_exit`` runs in the
master after the workers have exited)."""

from __future__ import annotations

import sys
from typing import Any


def on_exit(server: Any) -> None:
    app = sys.modules.get("prefork_app")
    if app is not None:
        app.master_report()
