"""The dashboard: server-rendered pages under ``/ui`` with charts drawn as SVG on the server."""

from app.ui.routes import install, router

__all__ = ["install", "router"]
