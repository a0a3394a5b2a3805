"""A process using ``@m.cached``, driven line by line over stdin (tests/test_cached.py):
``call X``, ``invalidate X``, ``local X`` (the local copy's entry, no server call); each
answer is one JSON line with the map's hit and miss counts. The loader counts its runs on
the server (``<map>:loads``) and takes 0.5 s, so calls sent together overlap."""

import json
import sys
import time

import redis

import syncmap

url, name = sys.argv[1], sys.argv[2]
node = syncmap.connect(url)
m = node.map(name, max_staleness=60.0)
counter = redis.Redis.from_url(url)


@m.cached(ttl=60)
def slow_square(x: int) -> int:
    counter.incr(f"{name}:loads")
    time.sleep(0.5)
    return x * x


print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    command, arg = line.split()
    if command == "call":
        out = slow_square(int(arg))
    elif command == "invalidate":
        out = slow_square.invalidate(int(arg))
    else:
        out = m.get_local(slow_square.key(int(arg)), "missing")
    stats = m.stats
    print(json.dumps({"out": out, "hits": stats.hits, "misses": stats.misses}), flush=True)
