"""The background task that keeps a :class:`~server.constitutions.registry.ConstitutionRegistry` fresh."""

from __future__ import annotations

import asyncio

from server.constitutions.registry import ConstitutionRegistry


async def watch(registry: ConstitutionRegistry, interval: float = 1.0) -> None:
    """Refresh ``registry`` every ``interval`` seconds, forever, in a worker thread (the event loop never blocks on
    the disk). Start it as a background task in the app's lifespan and cancel it on shutdown. An unexpected exception
    is logged (with its traceback once per distinct failure) and the watch goes on."""
    last_failure: str | None = None
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(registry.refresh)
        except Exception as e:
            failure = f"{type(e).__name__}: {e}"
            if failure != last_failure:
                registry.log.exception("constitution refresh failed (retrying every %ss)", interval)
            else:
                registry.log.debug("constitution refresh failed again: %s", failure)
            last_failure = failure
        else:
            last_failure = None
