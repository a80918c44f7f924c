"""The inference engine of the HTTP service (see :mod:`server.engine.engine`): its public API."""

from server.engine.backend import EngineBackend
from server.engine.delivery import EventStream, Handle, Mailbox
from server.engine.engine import Engine
from server.engine.request import Delta, Done, EngineStopped, Event, GenParams, QueueFull, TokenLogprob, UnknownModel

__all__ = ["Delta", "Done", "Engine", "EngineBackend", "EngineStopped", "Event", "EventStream", "GenParams", "Handle",
           "Mailbox", "QueueFull", "TokenLogprob", "UnknownModel"]
