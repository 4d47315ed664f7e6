"""`continuum serve`: the HTTP API (uvicorn), with an in-process projection follower.

With `--project` (the default) the serving process also keeps the read models up to date from
the store, so that census and audit-trail answers follow the log within about a second. Run
projection workers apart instead (`continuum project --follow`, or the Kafka group of issue 7)
and pass `--no-project` when the API runs as several processes on several machines."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from typing import Annotated, Any

import typer

APP_FACTORY = "continuum.entrypoints.http.app:app_factory"


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (CONTINUUM_API_HOST).")] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port (CONTINUUM_API_PORT).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, max=64, help="Worker processes (CONTINUUM_API_WORKERS)."),
    ] = None,
    project: Annotated[
        bool,
        typer.Option(
            "--project/--no-project",
            help="Keep the read models up to date from the store in this process.",
        ),
    ] = True,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json, interactive docs at /docs)."""
    from continuum.entrypoints.cli import _app, _errors, err

    with _app() as application, _errors():
        settings = application.settings
        # Workers re-read the environment: carry the options there.
        for name, value in (("API_HOST", host), ("API_PORT", port), ("API_WORKERS", workers)):
            if value is not None:
                os.environ[f"CONTINUUM_{name}"] = str(value)
        bind_host = host or settings.api_host
        bind_port = port or settings.api_port
        count = workers or settings.api_workers
        metrics_dir = _multiprocess_metrics() if count > 1 else None
        stop = threading.Event()
        follower = _start_projector(application, stop) if project else None
        err.print(
            f"serving care-continuum on http://{bind_host}:{bind_port} ({count} worker"
            f"{'s' if count > 1 else ''}; auth {settings.auth_mode}; projections "
            f"{'in-process' if follower else 'external'})",
            markup=False,
        )
        try:
            _run_uvicorn(bind_host, bind_port, count, log_level)
        finally:
            stop.set()
            if follower is not None:
                follower.join(timeout=30)
            if metrics_dir is not None:
                metrics_dir.cleanup()


def _run_uvicorn(host: str, port: int, workers: int, log_level: str) -> None:
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    options: dict[str, Any] = {
        "factory": True,
        "host": host,
        "port": port,
        "workers": workers,
        "log_level": log_level,
        "proxy_headers": True,
    }
    if workers == 1:
        uvicorn.run(APP_FACTORY, **options)
        return
    # What uvicorn.run does for several workers, but with a listening socket whose protocol is
    # TCP: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections accepted from
    # such a socket, and uvicorn's own (protocol 0) left every keep-alive response's body
    # waiting about 40 ms for the client's delayed ACK of its headers.
    config = uvicorn.Config(APP_FACTORY, **options)
    Multiprocess(config, sockets=[tcp_listener(config.bind_socket())]).run()


def tcp_listener(sock: socket.socket) -> socket.socket:
    """The same listening socket, declared as TCP (IPPROTO_TCP) when it is an IP socket."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.proto:
        return sock
    return socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())


def _multiprocess_metrics() -> tempfile.TemporaryDirectory[str] | None:
    """Several worker processes: their Prometheus counters go to files in one directory that
    GET /metrics sums (prometheus_client multiprocess mode). An operator's own
    PROMETHEUS_MULTIPROC_DIR is used as it is (it must be emptied between runs)."""
    from continuum.entrypoints.http.metrics import MULTIPROC_ENV

    if os.environ.get(MULTIPROC_ENV):
        return None
    directory = tempfile.TemporaryDirectory(prefix="continuum-metrics-")
    os.environ[MULTIPROC_ENV] = directory.name
    return directory


def _start_projector(application: object, stop: threading.Event) -> threading.Thread | None:
    from continuum.adapters.sql.database import create_database_engine, is_sqlite
    from continuum.adapters.sql.notify import PgNotifyWaiter
    from continuum.bootstrap import App
    from continuum.entrypoints.cli import err
    from continuum_projections.readmodel import ReadModel
    from continuum_projections.runners import StoreRunner

    assert isinstance(application, App)
    settings = application.settings
    engine = (
        create_database_engine(settings.read_model_url)
        if settings.read_model_url
        else application.engine
    )
    model = ReadModel(engine)
    model.create()
    if model.source() not in (None, "store"):
        err.print(f"read model fed by {model.source()}: no in-process projector", markup=False)
        return None
    runner = StoreRunner(application.store, model, application.policies)
    waiter = None if is_sqlite(application.engine) else PgNotifyWaiter(application.engine)

    def follow() -> None:
        try:
            runner.follow(stop, wait=waiter.wait if waiter else None)
        except Exception as exc:  # the API keeps serving; readiness reports the growing lag
            err.print(f"projector stopped: {type(exc).__name__}: {exc}", markup=False)
        finally:
            if waiter:
                waiter.close()
            if engine is not application.engine:
                engine.dispose()

    thread = threading.Thread(target=follow, name="projector", daemon=True)
    thread.start()
    return thread
