"""`terrabeam serve`: the JSON API over a real demo run (FastAPI's TestClient), the live progress file,
and the page in a real headless Chromium against a `terrabeam serve` process, with no network.

The workspace holds one real run of the demo config (the Sentinel-2 scene and U-Net, the map cut into
two tiles so that both the VRT mosaic and the single COG exist) and one synthetic failed run written
straight into the run history (its record only: no folder), for the error column.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import morecantile
import numpy as np
import pytest
import rasterio
from fastapi.testclient import TestClient
from PIL import Image
from rasterio.warp import transform, transform_bounds
from rio_tiler.colormap import cmap

from terrabeam.cli import main
from terrabeam.errors import WorkspaceError
from terrabeam.progress import RUN_FILE, Progress, progress_file
from terrabeam.serve.app import create_app
from terrabeam.workflow.state import RunState

CLASSES = ["clear", "cloud", "shadow"]
COLORS = {"clear": "#3a7d44", "cloud": "#f2f2f2", "shadow": "#3b3b98"}  # examples/sentinel2-cloudmask.yaml
TMS = morecantile.tms.get("WebMercatorQuad")
REPO = Path(__file__).resolve().parents[1]
FADE_MS = 1000  # Leaflet fades new tiles in (0.2 s): screenshots wait for them to settle


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, demo_data) -> Path:
    from conftest import DEMO_CONFIG

    tmp = tmp_path_factory.mktemp("dashboard")
    config = tmp / "config.yaml"
    config.write_text(
        DEMO_CONFIG.read_text()
        .replace("../data/demo", str(demo_data))
        .replace("workspace: ../workspace", f"workspace: {tmp / 'ws'}")
        .replace("outputs:\n", "outputs:\n  tile_size: 384\n")
    )
    assert main(["run", str(config), "--run", "demo"]) == 0
    state = RunState(tmp / "ws" / "terrabeam.db")
    try:  # a failed run after it, so the newest first
        state.create_run("broken", "other-pipeline", "0123456789abcdef", None, ["map"])
        state.start_attempt("broken", "map")
        state.fail_step("broken", "map", "model.onnx: expects 6 bands, got 5", "failed")
        state.finish_run("broken", "failed", error="model.onnx: expects 6 bands, got 5")
    finally:
        state.close()
    return tmp / "ws"


@pytest.fixture(scope="module")
def client(workspace) -> TestClient:
    return TestClient(create_app(workspace))


def class_cog(workspace: Path) -> Path:
    return workspace / "demo" / "deliver" / "sentinel2-cloudmask-classes.tif"


def centre_tile(cog: Path, z: int) -> morecantile.Tile:
    with rasterio.open(cog) as dataset:
        west, south, east, north = transform_bounds(dataset.crs, "EPSG:4326", *dataset.bounds)
    return TMS.tile((west + east) / 2, (south + north) / 2, z)


def cog_at_tile_pixels(cog: Path, tile: morecantile.Tile, band: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The COG's band at the centre of each of the tile's 256 × 256 pixels (nearest pixel, full
    resolution), and where it has data; the oracle the served tiles are checked against."""
    bounds = TMS.xy_bounds(tile)
    step_x, step_y = (bounds.right - bounds.left) / 256, (bounds.top - bounds.bottom) / 256
    xs, ys = np.meshgrid(
        bounds.left + (np.arange(256) + 0.5) * step_x, bounds.top - (np.arange(256) + 0.5) * step_y
    )
    with rasterio.open(cog) as dataset:
        east, north = transform("EPSG:3857", dataset.crs, xs.ravel(), ys.ravel())
        cols, rows = ~dataset.transform * (np.array(east), np.array(north))
        cols, rows = np.floor(cols).astype(int), np.floor(rows).astype(int)
        inside = (cols >= 0) & (cols < dataset.width) & (rows >= 0) & (rows < dataset.height)
        data = dataset.read(band)
        values = np.zeros(cols.shape, data.dtype)
        values[inside] = data[rows[inside], cols[inside]]
        valid = inside & (values != dataset.nodata) if dataset.nodata == dataset.nodata else inside
        if np.issubdtype(data.dtype, np.floating):
            valid &= ~np.isnan(values)
    return values.reshape(256, 256), valid.reshape(256, 256)


def assert_class_tile_matches_cog(png: bytes, cog: Path, tile: morecantile.Tile) -> None:
    """A class tile is the COG's classes in its colour table at that place, transparent off the map:
    at least 99.5 % of pixels (GDAL's warper approximates the reprojection to 1/8 pixel, which may
    move a class boundary by one tile pixel)."""
    served = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))
    classes, valid = cog_at_tile_pixels(cog, tile)
    with rasterio.open(cog) as dataset:
        table = dataset.colormap(1)
    expected = np.zeros((256, 256, 4), np.uint8)
    expected[valid] = np.array([table[c] for c in range(len(CLASSES))], np.uint8)[classes[valid]]
    expected[valid, 3] = 255
    assert len(np.unique(classes[valid])) >= 2, "pick a tile with more than one class"
    same = np.all(served == expected, axis=-1)
    assert same.mean() >= 0.995, f"tile {tile}: {100 * (1 - same.mean()):.2f} % of pixels differ"


def test_runs_list_the_demo_run_and_the_failed_run(client):
    runs = client.get("/api/runs").json()
    assert [r["id"] for r in runs] == ["broken", "demo"]  # newest first
    broken, demo = runs
    assert demo["pipeline"] == "sentinel2-cloudmask" and demo["status"] == "done"
    assert demo["pixels"] == 768 * 384 and demo["mpx_per_second"] > 0 and demo["window"] is None
    assert demo["step_seconds"] > 0 and demo["wall_seconds"] >= demo["step_seconds"]
    assert demo["error"] is None and demo["failed_step"] is None
    assert broken["status"] == "failed" and broken["failed_step"] == "map"
    assert broken["error"] == "model.onnx: expects 6 bands, got 5"


def test_run_detail_has_steps_outputs_and_the_map(client, workspace):
    run = client.get("/api/runs/demo").json()
    assert [(s["name"], s["status"], s["attempts"]) for s in run["steps"]] == [("map", "done", 1)]
    assert run["steps"][0]["details"]["tiles"] == 2 and run["steps"][0]["seconds"] > 0
    names = {o["name"] for o in run["outputs"]}
    assert "sentinel2-cloudmask-classes.tif" in names and all(o["exists"] for o in run["outputs"])
    m = run["map"]
    assert [(c["value"], c["name"], c["color"]) for c in m["classes"]] == [
        (i, name, COLORS[name]) for i, name in enumerate(CLASSES)
    ]
    assert m["probabilities"] == CLASSES and len(m["probability_colors"]) == 11
    with rasterio.open(class_cog(workspace)) as dataset:
        lonlat = transform_bounds(dataset.crs, "EPSG:4326", *dataset.bounds)
    np.testing.assert_allclose(m["bounds"], lonlat, atol=1e-3)
    assert m["minzoom"] <= m["maxzoom"] < m["max_overzoom"]
    assert run["progress"] is None
    failed = client.get("/api/runs/broken").json()
    assert failed["map"] is None and failed["steps"][0]["error"] == "model.onnx: expects 6 bands, got 5"


@pytest.mark.parametrize("z", [12, 13])
def test_class_tile_is_the_cog_in_its_colour_table(client, workspace, z):
    tile = centre_tile(class_cog(workspace), z)
    response = client.get(f"/api/runs/demo/tiles/{tile.z}/{tile.x}/{tile.y}.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert_class_tile_matches_cog(response.content, class_cog(workspace), tile)


def test_probability_tile_is_the_band_through_the_colormap(client, workspace):
    """Band 2 (P(cloud)) stretched 0–1 over viridis; bilinear on the server, so compared with the
    nearest pixel's colour within a few levels."""
    cog = workspace / "demo" / "deliver" / "sentinel2-cloudmask-probabilities.tif"
    tile = centre_tile(cog, 13)
    response = client.get(f"/api/runs/demo/tiles/{tile.z}/{tile.x}/{tile.y}.png?layer=probabilities&band=2")
    assert response.status_code == 200
    served = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGBA")).astype(int)
    values, valid = cog_at_tile_pixels(cog, tile, band=2)
    assert valid.all() and values.min() < 0.2 and values.max() > 0.8  # both ends of the ramp in view
    viridis = np.array([cmap.get("viridis")[i] for i in range(256)], int)
    expected = viridis[np.round(np.clip(values, 0, 1) * 255).astype(int)]
    assert (served[..., 3] == 255).all()
    assert np.median(np.abs(served[..., :3] - expected[..., :3])) <= 2


def test_unknown_run_band_and_tile_outside_the_map_are_404(client):
    assert client.get("/api/runs/nope").status_code == 404
    assert "no run 'nope'" in client.get("/api/runs/nope/tiles/12/2191/1343.png").json()["detail"]
    assert client.get("/api/runs/demo/tiles/12/0/0.png").status_code == 404
    assert client.get("/api/runs/demo/tiles/12/2191/1343.png?layer=probabilities&band=4").status_code == 404
    assert client.get("/api/runs/broken/quicklook").status_code == 404


def test_quicklook_and_the_page_are_served(client, workspace):
    quicklook = client.get("/api/runs/demo/quicklook")
    expected = workspace / "demo" / "deliver" / "sentinel2-cloudmask-quicklook.png"
    assert quicklook.status_code == 200 and quicklook.content == expected.read_bytes()
    page = client.get("/").text
    assert "/static/vendor/leaflet/leaflet.js" in page and "http" not in page.replace('href="/', "")
    assert client.get("/static/vendor/leaflet/leaflet.js").text.startswith("/* @preserve\n * Leaflet 1.9.4")
    assert "/api/runs/{run_id}/tiles/{z}/{x}/{y}.png" in client.get("/openapi.json").json()["paths"]


def _fingerprint(workspace: Path) -> dict[str, str]:
    """Every file of the workspace but SQLite's own shared-memory files, by content."""
    return {
        str(p.relative_to(workspace)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(workspace.rglob("*"))
        if p.is_file() and not p.name.endswith(("-shm", "-wal"))
    }


def test_read_only(workspace):
    """Every route leaves the workspace byte for byte as it was; the history is opened read-only."""
    before = _fingerprint(workspace)
    client = TestClient(create_app(workspace))
    tile = centre_tile(class_cog(workspace), 12)
    for url in (
        "/",
        "/api/runs",
        "/api/runs/demo",
        "/api/runs/broken",
        f"/api/runs/demo/tiles/{tile.z}/{tile.x}/{tile.y}.png",
        f"/api/runs/demo/tiles/{tile.z}/{tile.x}/{tile.y}.png?layer=probabilities&band=3",
        "/api/runs/demo/quicklook",
    ):
        assert client.get(url).status_code == 200, url
    assert client.post("/api/runs").status_code == 405 and client.delete("/api/runs/demo").status_code == 405
    assert _fingerprint(workspace) == before
    state = RunState(workspace / "terrabeam.db", read_only=True)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            state.finish_run("demo", "failed", error="x")
    finally:
        state.close()


def test_no_history_is_one_line_error(tmp_path, capsys):
    with pytest.raises(WorkspaceError, match="no run history here"):
        create_app(tmp_path)
    assert main(["serve", "--workspace", str(tmp_path), "--port", "0"]) == 1
    assert capsys.readouterr().err == (
        f"terrabeam: error: {tmp_path}: no run history here (terrabeam.db); give --workspace\n"
    )


def test_port_in_use_is_one_line_error(workspace, capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["serve", "--workspace", str(workspace), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"terrabeam: error: cannot listen on 127.0.0.1:{port} (") and err.count("\n") == 1
    assert err.endswith("; give another --port\n")


def test_live_progress_of_a_running_run(tmp_path):
    """Synthetic: a run recorded as running, its step reporting through Progress into the run's
    progress file, as the runner arranges (next test); the API shows it."""
    (tmp_path / "live").mkdir()
    state = RunState(tmp_path / "terrabeam.db")
    state.create_run("live", "p", "0123456789abcdef", ("2024-01-01", "2024-02-01"), ["map"])
    state.start_attempt("live", "map")
    state.close()
    with progress_file(tmp_path / "live" / RUN_FILE), Progress("map", 8, "tile", stream=io.StringIO()) as p:
        p.advance(3)
        time.sleep(0.6)  # past FILE_INTERVAL
        p.advance(2)
        run = TestClient(create_app(tmp_path)).get("/api/runs/live").json()
    assert run["status"] == "running" and run["window"] == ["2024-01-01", "2024-02-01"]
    assert run["progress"]["label"] == "map" and run["progress"]["done"] == 5
    assert run["progress"]["total"] == 8 and run["progress"]["unit"] == "tile" and run["progress"]["rate"] > 0
    assert run["steps"][0]["status"] == "running" and run["map"] is None


def test_runner_writes_the_progress_file_while_a_step_runs(tiny_pipeline):
    """The step (a stand-in, synthetic scene) reports through Progress; the runner points it at the
    run's progress file for the step's duration."""
    from terrabeam.config import load_config
    from terrabeam.workflow import steps
    from terrabeam.workflow.runner import Runner

    document, write = tiny_pipeline
    config = load_config(write())
    seen = []

    def step(config, workspace, beam_args):
        with Progress("map", 2, "tile", stream=io.StringIO()) as progress:
            progress.advance(2)
        seen.append(json.loads((workspace.run_dir / RUN_FILE).read_text()))
        return steps.StepReport("map", 0.1, {"patches": 2, "region_pixels": [70, 50], "outputs": []})

    root = Path(document["workspace"])
    record = Runner(config, root, step_functions={"map": step}).run("r")
    assert record.status == "done" and steps.run_steps(config) == ["map"]
    assert not (root / "r" / RUN_FILE).exists()  # gone with the step
    assert seen and {k: seen[0][k] for k in ("label", "done", "total", "unit")} == {
        "label": "map",
        "done": 2,
        "total": 2,
        "unit": "tile",
    }


# --- the page in a real browser ----------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise pytest.fail.Exception(
            "Chromium missing: run `make test` (it installs it), or as root: apt-get install chromium",
            pytrace=False,
        )
    return path


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("TERRABEAM_ARTIFACTS", tmp_path / "artifacts")) / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {folder}")
    return folder


@pytest.fixture
def server(workspace):
    """`terrabeam serve` on a free port of 127.0.0.1: its URL, from the line it prints."""
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen(
        [sys.executable, "-m", "terrabeam", "serve", "--workspace", str(workspace), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = process.stderr.readline()
        match = re.search(r"read-only at (http://127\.0\.0\.1:\d+/)", line)
        assert match, f"terrabeam serve printed {line!r}"
        yield match.group(1)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.integration
def test_the_page_in_chromium_with_no_network(server, workspace, chromium, artifacts):
    from playwright.sync_api import sync_playwright

    tiles: dict[str, bytes] = {}
    blocked: list[str] = []

    def local_only(route):
        if route.request.url.startswith(server):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort("internetdisconnected")

    def keep_tile(response):
        if "/tiles/" in response.url and "layer=classes" in response.url and response.status == 200:
            tiles[response.url] = response.body()

    args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium refuses root with its sandbox
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=args)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.route("**/*", local_only)
            page.on("response", keep_tile)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))

            page.goto(server)
            page.wait_for_selector("#runs-table")
            demo_row = page.inner_text('#runs-table tr[data-run="demo"]')
            assert "sentinel2-cloudmask" in demo_row and "done" in demo_row and "294,912" in demo_row
            assert "map: model.onnx: expects 6 bands, got 5" in page.inner_text('tr[data-run="broken"]')
            page.screenshot(path=artifacts / "runs.png", full_page=True)

            page.click('a[href="#/runs/demo"]')
            page.wait_for_selector("#steps-table")
            step_row = page.inner_text('#steps-table tr[data-step="map"]')
            assert "done" in step_row and "tiles=2" in step_row
            page.wait_for_function(
                "document.querySelectorAll('.tiles-classes img.leaflet-tile-loaded').length >= 4"
            )
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(FADE_MS)
            assert page.inner_text("#legend").split("\n") == ["0 clear", "1 cloud", "2 shadow"]
            page.screenshot(path=artifacts / "run-classes.png", full_page=True)

            page.select_option("#layer-select", "prob:2")
            page.wait_for_function(
                "document.querySelectorAll('.tiles-prob-2 img.leaflet-tile-loaded').length >= 4"
            )
            page.fill("#opacity", "0.5")
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(FADE_MS)
            assert "P(cloud)" in page.inner_text("#legend")
            page.screenshot(path=artifacts / "run-probability-cloud.png", full_page=True)
            assert errors == [], errors
        finally:
            browser.close()

    assert blocked == [], f"the page reached outside 127.0.0.1: {blocked}"
    assert len(tiles) >= 4
    checked = 0
    for url, png in tiles.items():
        z, x, y = map(int, re.search(r"/tiles/(\d+)/(\d+)/(\d+)\.png", url).groups())
        tile = morecantile.Tile(x, y, z)
        classes, valid = cog_at_tile_pixels(class_cog(workspace), tile)
        if valid.sum() > 256 * 64 and len(np.unique(classes[valid])) >= 2:
            assert_class_tile_matches_cog(png, class_cog(workspace), tile)
            checked += 1
    assert checked >= 1, "no fetched tile covered enough of the map to compare"
