"""The two drivers that run core flows: one blocking, one asyncio. Everything else is shared.

Each turns an :mod:`~syncmap._core.ops` operation into a redis-py call and feeds the result
(or the translated error) back into the flow. redis-py errors become syncmap errors here.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, TypeVar

import redis
import redis.asyncio
from redis.exceptions import NoScriptError

from ._core.ops import Command, Flow, Op, Script, Sleep
from ._errors import SyncMapError, translate_redis_error
from ._scripts import script_commands

__all__ = ["AsyncDriver", "SyncDriver"]

T = TypeVar("T")


class _DriverBase:
    def __init__(self, address: str) -> None:
        self.address = address

    def _translate(self, exc: Exception) -> Exception:
        if isinstance(exc, SyncMapError):
            return exc
        return translate_redis_error(exc, self.address) or exc


class SyncDriver(_DriverBase):
    def __init__(self, client: redis.Redis, address: str) -> None:
        super().__init__(address)
        self.client = client

    def perform(self, op: Op) -> Any:
        try:
            if isinstance(op, Command):
                return self.client.execute_command(*op.args)  # type: ignore[no-untyped-call]
            if isinstance(op, Script):
                evalsha, eval_ = script_commands(op)
                try:
                    return self.client.execute_command(*evalsha)  # type: ignore[no-untyped-call]
                except NoScriptError:
                    return self.client.execute_command(*eval_)  # type: ignore[no-untyped-call]
            if isinstance(op, Sleep):
                time.sleep(max(0.0, op.seconds))
                return None
        except Exception as exc:
            raise self._translate(exc) from exc
        raise TypeError(f"unknown operation {op!r}")

    def run(self, flow: Flow[T]) -> T:
        try:
            op = next(flow)
            while True:
                try:
                    result = self.perform(op)
                except Exception as exc:
                    op = flow.throw(exc)
                else:
                    op = flow.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


class AsyncDriver(_DriverBase):
    def __init__(self, client: redis.asyncio.Redis, address: str) -> None:
        super().__init__(address)
        self.client = client

    async def perform(self, op: Op) -> Any:
        try:
            if isinstance(op, Command):
                return await self.client.execute_command(*op.args)  # type: ignore[no-untyped-call]
            if isinstance(op, Script):
                evalsha, eval_ = script_commands(op)
                try:
                    return await self.client.execute_command(*evalsha)  # type: ignore[no-untyped-call]
                except NoScriptError:
                    return await self.client.execute_command(*eval_)  # type: ignore[no-untyped-call]
            if isinstance(op, Sleep):
                await asyncio.sleep(max(0.0, op.seconds))
                return None
        except Exception as exc:
            raise self._translate(exc) from exc
        raise TypeError(f"unknown operation {op!r}")

    async def run(self, flow: Flow[T]) -> T:
        try:
            op = next(flow)
            while True:
                try:
                    result = await self.perform(op)
                except Exception as exc:
                    op = flow.throw(exc)
                else:
                    op = flow.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
