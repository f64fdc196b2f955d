"""The live control plane: ``LiveController`` (books + planner, asyncio), ``GrpcMover``
(moves through the node agents), ``ControllerActor`` (the Ray shell, in ``actor``)."""

from controller.runtime.contracts import Admission, GateTimeout, Mover, SessionClosed
from controller.runtime.live import LiveController
from controller.runtime.mover import GrpcMover
from controller.runtime.policies import LIVE_POLICIES, LivePolicy

__all__ = ["LIVE_POLICIES", "Admission", "GateTimeout", "GrpcMover", "LiveController", "LivePolicy", "Mover",
           "SessionClosed"]
