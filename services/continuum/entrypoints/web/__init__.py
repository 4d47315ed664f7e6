"""The case managers' web console (issue 6): server-rendered pages at /console, served by
the API's own FastAPI app. See docs/console.md."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

PREFIX = "/console"
STATIC = Path(__file__).parent / "static"


def install(app: FastAPI) -> None:
    """Add the console's routes (left out of the OpenAPI document) and its static files."""
    from continuum.entrypoints.web.router import root, router

    app.include_router(router)
    app.include_router(root)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=STATIC), name="console-static")
