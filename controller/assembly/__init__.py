"""The assembly of the platform (top layer): the Serve application (``build_app``, Serve's
import path ``controller.assembly:build_app``), the launch of the controller and the node
agents, and the embedded local platform behind ``lull up`` / ``status`` / ``down``."""

__all__ = ["build_app"]


def __getattr__(name: str):
    # On first use, not at import: a gateway replica imports controller.gateway.deployment
    # first (unpickling its class), which imports controller.assembly.launch; an eager import
    # of app here would import that half-loaded deployment module again.
    if name == "build_app":
        from controller.assembly.app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
