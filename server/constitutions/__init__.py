"""The constitutions the service serves, reloaded live (:mod:`~server.constitutions.registry`), the state of each
watched file (:mod:`~server.constitutions.files`) and the background watch (:mod:`~server.constitutions.watch`)."""

from server.constitutions.files import Loaded, LoadError
from server.constitutions.registry import ConstitutionRegistry
from server.constitutions.watch import watch

__all__ = ["ConstitutionRegistry", "LoadError", "Loaded", "watch"]
