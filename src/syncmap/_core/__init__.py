"""The part of syncmap that does no I/O.

Nothing under ``_core`` imports ``redis``, ``threading``, ``asyncio`` or reads the wall clock:
it decides, the drivers (``_driver``) talk to the server. Logic written here serves the sync
and the asyncio API alike, and is unit-tested with scripted replies.
"""
