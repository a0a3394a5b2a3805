"""A small Django project for the tests: syncmap's cache backend in settings, a few views.

The server and the map come from the environment (the tests start the server), so the same
project runs in the test process and under ``manage.py runserver`` in subprocesses.
"""

import os

SECRET_KEY = "syncmap-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "djproject.urls"
INSTALLED_APPS = ["djproject"]
MIDDLEWARE: list[str] = []
USE_TZ = True
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

CACHES = {
    "default": {
        "BACKEND": "syncmap.django.SyncMapCache",
        "LOCATION": os.environ.get("DJPROJECT_CACHE_URL", ""),
        "TIMEOUT": 300,
        "OPTIONS": {
            "name": os.environ.get("DJPROJECT_CACHE_MAP", "djproject"),
            "max_staleness": float(os.environ.get("DJPROJECT_MAX_STALENESS", "1.0")),
        },
    },
}
