"""Errors that cross a Ray actor boundary, matched by class name: the callers (gateway,
engine replicas) must not import the controller runtime to catch its errors, and errors
raised in an actor arrive as RayTaskError subclasses of the original class."""

from __future__ import annotations

# A Ray actor that is dead or restarting (the controller, or an engine replica).
ACTOR_GONE = ("ActorDiedError", "ActorUnavailableError")
# The controller actor is gone, restarting, or restarted without its books yet
# (`controller.runtime.actor.ControllerNotStarted`).
CONTROLLER_GONE = (*ACTOR_GONE, "ControllerNotStarted")


def is_error(error: BaseException, name: str) -> bool:
    """``error`` is of the class named ``name``, or of a subclass of it."""
    return any(cls.__name__ == name for cls in type(error).__mro__)


def controller_gone(error: BaseException) -> bool:
    """The controller actor is dead, restarting, or restarted without its books yet."""
    return any(is_error(error, name) for name in CONTROLLER_GONE)


def cause(error: BaseException) -> BaseException:
    """The original error behind a RayTaskError (whose str() carries the remote traceback)."""
    return getattr(error, "cause", None) or error
