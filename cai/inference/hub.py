"""The Hugging Face hub, asked once and quickly before any download.

``huggingface_hub`` retries a connection that fails (five times, backing off to 8 s) on every file it is asked for,
so a hub id on a machine that cannot reach the hub used to fail only after about 50 s. Before a hub id is loaded,
:func:`hub_source` sends one ``HEAD`` to the hub's endpoint (``HF_ENDPOINT`` as ``huggingface_hub`` reads it, through
its own HTTP client, so proxies and certificates are the ones every download uses) with a short timeout:

- reachable: the id is loaded from the hub as before (and from the cache when it is there);
- not reachable, and the model is in the local HF cache: the cached snapshot folder is loaded, with no network;
- not reachable, not cached: a :class:`ModelError` saying so, within :data:`PROBE_TIMEOUT_S`.

With ``HF_HUB_OFFLINE=1`` nothing is probed (the libraries read the cache only). Local folders and the default
model never come here.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from cai.core.errors import ModelError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0       # connect + first byte of the hub's answer
_REMEMBER_S = 60.0          # a hub that answered is not asked again for this long
LOAD_HINT = ("Give a local folder written by save_pretrained, a Hugging Face id (needs the hub or its cache), or "
             "'default' for the offline SmolLM2-135M-Instruct.")

_answered: dict[str, float] = {}      # endpoint -> monotonic time it last answered
_lock = threading.Lock()


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def unreachable(url: str | None = None) -> str | None:
    """None when the hub at ``url`` (default: the configured endpoint) answers an HTTP request within
    :data:`PROBE_TIMEOUT_S` (any status counts: it is there), else why not."""
    from huggingface_hub.utils import get_session

    url = url or endpoint()
    with _lock:
        if time.monotonic() - _answered.get(url, -_REMEMBER_S) < _REMEMBER_S:
            return None
    try:
        get_session().head(url, timeout=PROBE_TIMEOUT_S)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.debug("hub probe %s failed: %s", url, reason)
        return reason
    with _lock:
        _answered[url] = time.monotonic()
    return None


def cached_snapshot(model_id: str, revision: str | None) -> Path | None:
    """The folder of ``model_id`` in the local HF cache (it holds a config.json), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model_id, "config.json", revision=revision)
    except Exception:
        return None
    return Path(found).parent if isinstance(found, str) else None


def hub_source(model_id: str, revision: str | None, name: str | None = None) -> str:
    """What ``from_pretrained`` should get for hub id ``model_id``: the id itself when the hub answers (or offline
    mode is on), the cached snapshot folder when it does not, else a clear :class:`ModelError` (``name``: the model
    as the user gave it, for the message)."""
    if offline():
        return model_id
    reason = unreachable()
    if reason is None:
        return model_id
    snapshot = cached_snapshot(model_id, revision)
    if snapshot is not None:
        log.info("the hub is not reachable (%s): loading %s from the local cache", reason, model_id)
        return str(snapshot)
    raise ModelError(f"cannot load model {name or model_id!r}: the Hugging Face hub at {endpoint()} is not reachable "
                     f"({reason}) and the model is not in the local cache", hint=LOAD_HINT)
