"""Serve's import path for Lull (`controller.app:build_app`, see controller/names.py)."""

from controller.gateway.app import build_app

__all__ = ["build_app"]
