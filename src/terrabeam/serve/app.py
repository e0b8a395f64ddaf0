"""The dashboard's web app (FastAPI): the page under /, its JSON API under /api (OpenAPI at /docs),
and `serve`, which runs it with uvicorn on 127.0.0.1 unless told otherwise. Only GET routes: it
never changes a run."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Query, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from terrabeam import __version__
from terrabeam.errors import ServeError
from terrabeam.serve import tiles
from terrabeam.serve.history import RunHistory, RunMap
from terrabeam.workflow.state import RunRecord
from terrabeam.workspace import resolve_root

STATIC = Path(__file__).parent / "static"
TILE_CACHE = "max-age=60"  # a re-delivered run replaces its maps: tiles are not kept for long


def create_app(root: Path, basemap: str | None = None) -> FastAPI:
    """The app over the workspace ``root`` (its terrabeam.db and run folders). ``basemap``: an XYZ
    tile URL template (``https://…/{z}/{x}/{y}.png``) the page offers as an online base layer; by
    default the page loads nothing from outside this server."""
    history = RunHistory(root)
    app = FastAPI(
        title="terrabeam dashboard",
        version=__version__,
        description="Read-only view of a terrabeam workspace: runs, steps, outputs and maps as tiles.",
    )

    def record_or_404(run_id: str) -> RunRecord:
        record = history.record(run_id)
        if record is None:
            raise HTTPException(404, f"no run {run_id!r} in {root}")
        return record

    def map_or_404(record: RunRecord) -> RunMap:
        run_map = history.run_map(record)
        if run_map is None:
            raise HTTPException(404, f"run {record.id} has no delivered class map in its deliver folder")
        return run_map

    @app.get("/api/workspace", summary="The workspace served and the page's settings")
    def workspace() -> dict[str, Any]:
        return {"root": str(root), "version": __version__, "basemap": basemap}

    @app.get("/api/runs", summary="All runs, newest first")
    def runs() -> list[dict[str, Any]]:
        return [history.summary(r) for r in history.records()]

    @app.get("/api/runs/{run_id}", summary="One run: steps, attempts, outputs, map, live progress")
    def run(run_id: str) -> dict[str, Any]:
        record = record_or_404(run_id)
        run_map = history.run_map(record)
        return history.detail(record) | {"map": tiles.map_info(run_map) if run_map else None}

    @app.get(
        "/api/runs/{run_id}/tiles/{z}/{x}/{y}.png",
        summary="A Web Mercator map tile rendered from the run's COGs",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such run, map or tile"}},
    )
    async def tile(
        run_id: str,
        z: int = PathParam(ge=0, le=30),
        x: int = PathParam(ge=0),
        y: int = PathParam(ge=0),
        layer: Literal["classes", "probabilities"] = Query(
            "classes", description="the class map, or one band of the probabilities"
        ),
        band: int = Query(1, ge=1, description="probabilities: band number, 1 = the first class"),
    ) -> Response:
        record = record_or_404(run_id)
        run_map = map_or_404(record)
        if layer == "classes":
            png = await run_in_threadpool(tiles.class_tile, run_map.classes, z, x, y)
        else:
            if run_map.probabilities is None:
                raise HTTPException(404, f"run {run_id} delivered no probabilities")
            try:
                png = await run_in_threadpool(tiles.probability_tile, run_map.probabilities, band, z, x, y)
            except IndexError as exc:
                raise HTTPException(404, str(exc)) from None
        if png is None:
            raise HTTPException(404, f"tile {z}/{x}/{y} lies outside the map of run {run_id}")
        return Response(png, media_type="image/png", headers={"Cache-Control": TILE_CACHE})

    @app.get(
        "/api/runs/{run_id}/quicklook",
        summary="The run's quicklook PNG (map, legend, scale)",
        response_class=FileResponse,
        responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such run or quicklook"}},
    )
    def quicklook(run_id: str) -> FileResponse:
        run_map = map_or_404(record_or_404(run_id))
        if run_map.quicklook is None:
            raise HTTPException(404, f"run {run_id} delivered no quicklook")
        return FileResponse(run_map.quicklook, media_type="image/png")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


def serve(location: str, host: str, port: int, basemap: str | None = None, verbose: bool = False) -> None:
    """Serve the dashboard of the workspace ``location`` (a folder, or gs:// / s3:// read through its
    local mirror) at http://host:port/ until interrupted (port 0: a free one); the URL goes to stderr."""
    import uvicorn

    root, remote = resolve_root(location)
    if remote is not None:
        from terrabeam.workflow.runner import pull_history

        pull_history(root, remote)  # into this machine's mirror, if it has no history yet
    app = create_app(root, basemap)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise ServeError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); give another --port"
        ) from None
    bound_port = listener.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"terrabeam: serving {root} read-only at http://{shown}:{bound_port}/", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose)
    uvicorn.Server(config).run(sockets=[listener])
