"""WSGI entry of the test project (``gunicorn djproject.wsgi``, with tests/ on the path).

With ``DJPROJECT_PRELOAD_KEY`` set, the app reads that key of the cache while it loads, as
apps that warm up at import do: under gunicorn ``--preload`` that happens in the master,
before it forks the workers, so that a node and a map exist before the fork.
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproject.settings")
application = get_wsgi_application()

LOADED_BY = os.getpid()  # the process that loaded the app (gunicorn --preload: the master)
PRELOADED = None
if "DJPROJECT_PRELOAD_KEY" in os.environ:
    from django.core.cache import cache

    PRELOADED = cache.get(os.environ["DJPROJECT_PRELOAD_KEY"])
