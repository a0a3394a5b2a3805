"""Views that use the cache as applications do: ``django.core.cache.cache`` (a backend
instance per thread), async views with ``aget``/``aset``, ``get_or_set``, ``cache_page``;
and ``worker_read``, a read that reports the process and its map's stats (for prefork
servers)."""

import os
import sys
import threading
import time
import uuid

import redis
from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import cache_page


def _state(value: object) -> JsonResponse:
    stats = cache.map.stats
    return JsonResponse(
        {
            "value": value,
            "hits": stats.hits,
            "misses": stats.misses,
            "map": id(cache.map),
            "instance": id(cache),
            "thread": threading.get_ident(),
            "pid": os.getpid(),
        }
    )


def set_value(request: HttpRequest, key: str) -> JsonResponse:
    cache.set(key, request.GET["v"])
    return _state(None)


def get_value(request: HttpRequest, key: str) -> JsonResponse:
    return _state(cache.get(key))


async def aset_value(request: HttpRequest, key: str) -> JsonResponse:
    await cache.aset(key, request.GET["v"])
    return _state(None)


async def aget_value(request: HttpRequest, key: str) -> JsonResponse:
    return _state(await cache.aget(key))


def load_once(request: HttpRequest, key: str) -> JsonResponse:
    """get_or_set with a slow callable that counts its runs on the server."""

    def load() -> str:
        url = settings.CACHES["default"]["LOCATION"]
        with redis.Redis.from_url(url) as r:
            r.incr(f"{key}:loads")
        time.sleep(float(request.GET.get("sleep", "0.3")))
        return f"loaded-{uuid.uuid4().hex[:8]}"

    return _state(cache.get_or_set(key, load, timeout=60))


@cache_page(60)
def cached_page(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"page {uuid.uuid4().hex}")


def worker_read(request: HttpRequest, key: str) -> JsonResponse:
    """``cache.get(key)`` in this process (``?hold=S`` then holds it S seconds, at most 0.1,
    so that concurrent requests spread over a prefork server's workers): the value, the pid,
    the pid that loaded the WSGI app (djproject.wsgi) and the map's stats."""
    value = cache.get(key)
    stats = cache.map.stats
    hold = request.GET.get("hold")
    if hold:
        time.sleep(min(float(hold), 0.1))
    wsgi = sys.modules.get("djproject.wsgi")
    return JsonResponse(
        {
            "pid": os.getpid(),
            "loaded_by": getattr(wsgi, "LOADED_BY", None),
            "value": value,
            "hits": stats.hits,
            "misses": stats.misses,
            "invalidations": stats.invalidations,
            "resyncs": stats.resyncs,
        }
    )
