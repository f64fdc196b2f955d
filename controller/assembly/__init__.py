"""The assembly of the platform (top layer): the Serve application (``build_app``, Serve's
import path ``controller.assembly:build_app``), the launch of the controller and the node
agents, and the embedded local platform behind ``lull up`` / ``status`` / ``down``."""

from controller.assembly.app import build_app

__all__ = ["build_app"]
