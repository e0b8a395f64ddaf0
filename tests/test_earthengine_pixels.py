"""The computePixels source (``source.fetch: compute_pixels``) through the real earthengine-api
against the 127.0.0.1 playback: requests sized under the limit, the rate limit and concurrency held
(counted in the playback), backoff on 429 / 503, and pixels equal to the export task's for the same
grid. The playback's pixels are synthetic (``synthetic_pixels``: a field of map coordinates, the
same for its exports and its computePixels answers); nothing here reached Google."""

# ruff: noqa: F811  (the fixtures imported from test_earthengine are parameters of the tests)
from __future__ import annotations

import json
import threading
import time
from datetime import date

import numpy as np
import pytest
import rasterio
import yaml
from test_earthengine import KH, KW, PROJECT, WINDOW, H, W, _config, gcs, grid_patches, services  # noqa: F401

from terrabeam.cli import main
from terrabeam.config import load_config, parse_config
from terrabeam.earthengine import EarthEngineError
from terrabeam.errors import ConfigError
from terrabeam.layout import list_shards
from terrabeam.region import stated_grid
from terrabeam.sources import earthengine_pixels
from terrabeam.sources.earthengine_pixels import (
    FetchLimits,
    RequestGate,
    pixels_reader,
    request_spans,
    uses_compute_pixels,
    worker_processes,
)
from terrabeam.tfrecord import decode_example, read_records
from terrabeam.workflow.state import RunState

ONE_PATCH = (W + KW) * (H + KH) * 3 * 5  # bytes of one patch's request: 3 bands, value + mask byte
TWO_PATCHES = (2 * W + KW) * (H + KH) * 3 * 5  # the margin between them is fetched once


def _pixels_config(tmp_path, playback, outputs=None, **earthengine):
    path = _config(tmp_path, playback, outputs=outputs or {"quicklook": False})
    document = yaml.safe_load(path.read_text())
    document["source"]["fetch"] = "compute_pixels"
    document["earthengine"] |= earthengine
    path.write_text(yaml.safe_dump(document))
    return path


def _maps(folder):
    with (
        rasterio.open(folder / "ee-landcover-classes.tif") as a,
        rasterio.open(folder / "ee-landcover-probabilities.tif") as b,
    ):
        return a.read(), b.read(), a.transform


def _arrivals_per_second(requests) -> int:
    """The most requests that arrived within any one second."""
    times = sorted(r.received for r in requests)
    return max(sum(1 for u in times if t <= u < t + 1.0) for t in times)


def test_compute_pixels_run_is_one_pipeline_with_the_export_tasks_pixels(tmp_path, services):
    playback = services
    playback.compute_seconds = 0.6  # longer than the 0.25 s between starts: 2 overlap
    # one patch per request → 12 requests, at most 4 per second, 2 at once
    config_path = _pixels_config(
        tmp_path, playback, max_request_bytes=TWO_PATCHES - 1, max_requests_per_second=4, max_concurrent=2
    )
    assert main(["run", str(config_path), "--run", "r1", "--window", WINDOW]) == 0
    assert not playback.calls("POST", "/image:export")  # no export task, no files on Cloud Storage
    requests = playback.calls("POST", "/image:computePixels")
    assert len(requests) == 12
    bands = load_config(config_path).source.band_names  # the derived ndvi last
    for request in requests:
        body = request.body
        dims = body["grid"]["dimensions"]
        assert (dims["width"], dims["height"]) == (W + KW, H + KH)  # one patch and its margin
        assert dims["width"] * dims["height"] * 3 * 5 < TWO_PATCHES
        assert body["fileFormat"] == "NPY" and body["bandIds"] == bands
        assert body["grid"]["crsCode"] == "EPSG:32633"
        sent = json.dumps(body["expression"])
        for part in ('"LANDSAT/LC09/C02/T1_L2"', '"reduce.median"', '"Image.unmask"', '"2024-02-01"'):
            assert part in sent, part  # the export's composite, masked pixels → source.fill_value
    # the limits held, counted where the requests arrived
    assert _arrivals_per_second(requests) <= 4
    assert playback.max_in_flight <= 2
    assert playback.max_in_flight == 2  # and the run used what it was allowed

    state = RunState(tmp_path / "ws" / "terrabeam.db")
    assert [s.name for s in state.get_run("r1").steps] == ["map"]
    state.close()

    # The same grid by an export task (export → predict → deliver): the same maps, pixel for pixel.
    document = yaml.safe_load(config_path.read_text())
    document["source"]["fetch"] = "export"
    document["workspace"] = str(tmp_path / "ws-export")
    (tmp_path / "export.yaml").write_text(yaml.safe_dump(document))
    assert main(["run", str(tmp_path / "export.yaml"), "--run", "r1", "--window", WINDOW]) == 0
    assert len(playback.calls("POST", "/image:export")) == 1
    by_pixels = _maps(tmp_path / "ws" / "r1" / "deliver")
    by_export = _maps(tmp_path / "ws-export" / "r1" / "deliver")
    assert by_pixels[2] == by_export[2]
    np.testing.assert_array_equal(by_pixels[0], by_export[0])
    np.testing.assert_array_equal(by_pixels[1], by_export[1])
    assert len(np.unique(by_pixels[0])) > 1  # both classes: the pixels decided the map

    # both maps say what the composite covers (12 months before the run's date), not the run's window
    for deliver in (tmp_path / "ws" / "r1" / "deliver", tmp_path / "ws-export" / "r1" / "deliver"):
        with rasterio.open(deliver / "ee-landcover-classes.tif") as ds:
            assert ds.tags()["TERRABEAM_WINDOW"] == "2024-02-01/2025-02-01"
        item = json.loads((deliver / "ee-landcover.item.json").read_text())["properties"]
        assert (item["start_datetime"], item["end_datetime"]) == (
            "2024-02-01T00:00:00Z",
            "2025-02-01T00:00:00Z",
        )


def test_patches_equal_the_export_tasks_patches_for_the_same_grid(tmp_path, services):
    """The reader's patches against the exported patches, value for value, with requests of
    several patches and a kernel margin (blocks cut where the limit falls)."""
    config = load_config(_pixels_config(tmp_path, services, max_request_bytes=3 * ONE_PATCH))
    grid, _ = stated_grid(config)
    reader = pixels_reader(config, grid, (date(2024, 2, 1), date(2025, 2, 1)), [])()
    expected = grid_patches(W, H, KW, KH)
    with reader:
        for row in range(3):
            patches = reader.read_block(row, 0, 4)
            assert [i for i, _ in patches] == [row * 4 + c for c in range(4)]
            for index, bands in patches:
                got = np.stack([bands[b] for b in ("red", "nir", "ndvi")])
                np.testing.assert_array_equal(got, expected[index])
    widths = [r.body["grid"]["dimensions"]["width"] for r in services.calls("POST", "/image:computePixels")]
    assert widths == [2 * W + KW] * 6  # 4 patches a row, 2 per request under 3 patches' bytes


def test_a_request_earth_engine_finds_too_large_is_asked_again_in_halves(tmp_path, services):
    """Earth Engine's own size accounting wins over terrabeam's estimate: refused with "Total
    request size …" (400), a request is split in halves until its parts fit, later requests stay
    at the size that fit, and the patches are the export's all the same."""
    services.compute_pixels_limit = 2 * (W + KW) * (H + KH) * 3 * 4  # two patches' values, no margin
    config = load_config(_pixels_config(tmp_path, services))
    grid, _ = stated_grid(config)
    reader = pixels_reader(config, grid, (date(2024, 2, 1), date(2025, 2, 1)), [])()
    expected = grid_patches(W, H, KW, KH)
    with reader:
        for row in range(3):
            for index, bands in reader.read_block(row, 0, 4):
                np.testing.assert_array_equal(
                    np.stack([bands[b] for b in ("red", "nir", "ndvi")]), expected[index]
                )
    widths = [r.body["grid"]["dimensions"]["width"] for r in services.calls("POST", "/image:computePixels")]
    four, two = 4 * W + KW, 2 * W + KW
    # row 0: 4 patches refused, then 2 + 2; rows 1 and 2: two patches a request from the start
    assert widths == [four, two, two] + [two] * 4
    services.compute_pixels_limit = 100  # not even one patch
    reader = pixels_reader(config, grid, (date(2024, 2, 1), date(2025, 2, 1)), [])()
    with reader, pytest.raises(EarthEngineError, match="one patch is more than Earth Engine answers"):
        reader.read_block(0, 0, 4)


def test_429_and_503_are_retried_after_backing_off(tmp_path, services):
    playback = services
    playback.compute_refusals = [(429, "1"), (503, None)]
    config_path = _pixels_config(tmp_path, playback, max_concurrent=1)
    assert main(["run", str(config_path), "--run", "r1", "--window", WINDOW]) == 0
    first, second, third, *rest = playback.calls("POST", "/image:computePixels")
    assert second.received - first.answered >= 1.0  # Retry-After: 1 was waited
    assert len(rest) == 2  # 3 patch rows, each one request, after the two refusals
    assert (tmp_path / "ws" / "r1" / "deliver" / "ee-landcover-classes.tif").exists()


def test_a_refused_request_fails_the_run_naming_the_block(tmp_path, services, capsys):
    services.compute_refusals = [(400, None)]
    config_path = _pixels_config(tmp_path, services, max_concurrent=1)
    assert main(["run", str(config_path), "--run", "r1", "--window", WINDOW]) == 1
    err = capsys.readouterr().err
    assert "Earth Engine refused computePixels for patch row 0, columns 0–3: HTTP 400" in err
    assert "Traceback" not in err
    assert not (tmp_path / "ws" / "r1" / "deliver").exists()


def test_compute_pixels_with_an_earth_engine_sink_writes_the_export_here(tmp_path, services):
    """With an Earth Engine output the interchange files are kept: the export step writes them
    from computePixels (no task), in the export's layout, records = the export task's patches."""
    outputs = {"earthengine": {"collection": f"projects/{PROJECT}/assets/terrabeam/lc"}, "quicklook": False}
    config_path = _pixels_config(tmp_path, services, outputs=outputs)
    assert main(["run", str(config_path), "--run", "r1", "--window", WINDOW]) == 0
    assert not services.calls("POST", "/image:export")
    shards = list_shards(tmp_path / "ws" / "r1" / "export", "ee")
    records = [decode_example(r) for s in shards for r in read_records(s)]
    expected = grid_patches(W, H, KW, KH)
    assert len(records) == 12
    for record, patch in zip(records, expected, strict=True):
        for k, band in enumerate(("red", "nir", "ndvi")):
            np.testing.assert_array_equal(record[band].reshape(H + KH, W + KW), patch[k])
    assert services.calls("POST", "/image:importExternal")  # delivered as a COG-backed image


def test_request_spans_stay_under_the_limit_or_say_why(tmp_path, services):
    document = yaml.safe_load(_pixels_config(tmp_path, services).read_text())
    config = parse_config(document, tmp_path)
    grid, _ = stated_grid(config)
    assert request_spans(config, grid, 0, 4) == [(0, 4)]  # 48 MiB: the whole row at once
    document["earthengine"]["max_request_bytes"] = TWO_PATCHES
    config = parse_config(document, tmp_path)
    spans = request_spans(config, grid, 0, 4)
    assert spans == [(0, 2), (2, 4)]
    assert request_spans(config, grid, 1, 4) == [(1, 3), (3, 4)]
    document["earthengine"]["max_request_bytes"] = ONE_PATCH - 1
    with pytest.raises(ConfigError, match="more than earthengine.max_request_bytes"):
        request_spans(parse_config(document, tmp_path), grid, 0, 4)
    document["earthengine"]["max_request_bytes"] = 49 * 2**20
    with pytest.raises(ConfigError, match="earthengine.max_request_bytes"):
        parse_config(document, tmp_path)


def test_auto_fetch_takes_compute_pixels_for_small_grids(tmp_path, services, monkeypatch):
    document = yaml.safe_load(_pixels_config(tmp_path, services).read_text())
    document["source"]["fetch"] = "auto"
    config = parse_config(document, tmp_path)
    assert uses_compute_pixels(config)  # 3 requests
    monkeypatch.setattr(earthengine_pixels, "AUTO_MAX_REQUESTS", 2)
    assert not uses_compute_pixels(config)
    monkeypatch.setattr(earthengine_pixels, "AUTO_MAX_REQUESTS", 1000)
    document["earthengine"]["max_request_bytes"] = ONE_PATCH - 1  # no patch fits in a request
    assert not uses_compute_pixels(parse_config(document, tmp_path))
    document["earthengine"].pop("max_request_bytes")
    document["source"]["fetch"] = "export"
    assert not uses_compute_pixels(parse_config(document, tmp_path))

    # counted on the blocks the run will read: tiles of 2 patches halve the map step's rows (6
    # requests), while an Earth Engine sink's export step reads whole rows (3 requests)
    document["source"]["fetch"] = "auto"
    document["outputs"]["tile_size"] = 2 * W
    monkeypatch.setattr(earthengine_pixels, "AUTO_MAX_REQUESTS", 4)
    assert not uses_compute_pixels(parse_config(document, tmp_path))
    document["outputs"]["earthengine"] = {"collection": f"projects/{PROJECT}/assets/terrabeam/lc"}
    assert uses_compute_pixels(parse_config(document, tmp_path))


def test_the_limits_are_shared_by_the_worker_processes(tmp_path, services):
    assert worker_processes([]) == 1
    assert worker_processes(["--direct_num_workers=4"]) == 1  # threads of this process: one gate
    assert worker_processes(["--direct_num_workers=4", "--direct_running_mode=multi_processing"]) == 4
    dataflow = ["--runner=DataflowRunner", "--max_num_workers=5", "--machine_type=n2-standard-4"]
    assert worker_processes(dataflow) == 20
    assert worker_processes([*dataflow, "--experiments=no_use_multiple_sdk_containers"]) == 5
    with pytest.raises(ConfigError, match="needs runner.max_workers"):
        worker_processes(["--runner=DataflowRunner"])
    assert worker_processes(["--runner=PortableRunner", "--sdk_worker_parallelism=3"]) == 3
    config = load_config(_pixels_config(tmp_path, services, max_requests_per_second=10, max_concurrent=8))
    assert FetchLimits.share(config, 4) == FetchLimits(2.5, 2)


def test_request_gate_spaces_starts_and_bounds_requests_in_flight():
    """Synthetic load, no network: 12 threads through a gate of 20/s and 3 at once."""
    gate = RequestGate(per_second=20, concurrent=3)
    starts, in_flight, most = [], [0], [0]
    lock = threading.Lock()

    def request():
        with gate.slot():
            with lock:
                starts.append(time.monotonic())
                in_flight[0] += 1
                most[0] = max(most[0], in_flight[0])
            time.sleep(0.3)  # longer than 3 starts apart: the third slot is the limit
            with lock:
                in_flight[0] -= 1

    threads = [threading.Thread(target=request) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    starts.sort()
    assert most[0] == 3
    assert min(b - a for a, b in zip(starts, starts[1:], strict=False)) >= 0.05 - 0.005
    gate.hold_off(0.3)  # after a 429: the next start waits
    before = time.monotonic()
    with gate.slot():
        assert time.monotonic() - before >= 0.29


def test_plan_counts_the_requests_and_says_one_pipeline(tmp_path, services, capsys):
    config_path = _pixels_config(tmp_path, services, max_request_bytes=TWO_PATCHES - 1)
    assert main(["plan", str(config_path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["steps"] == ["map"] and plan["earthengine_requests"] == 12  # a request per patch
    assert not services.calls("POST", "/image:computePixels")  # planning fetches nothing
    assert main(["plan", str(config_path)]) == 0
    assert "12 Earth Engine computePixels requests" in capsys.readouterr().out


def test_backoff_retries_lost_connections_and_gives_up_naming_the_block():
    """Synthetic failures, no network: a dropped connection is retried with jittered, growing
    pauses; a request failing every time ends in a transient error naming the block."""
    from terrabeam.errors import TransientError
    from terrabeam.sources.earthengine_pixels import MAX_ATTEMPTS, with_backoff

    now, pauses = [0.0], []

    def sleep(seconds):  # a clock that moves when slept on
        pauses.append(seconds)
        now[0] += seconds

    gate = RequestGate(per_second=1e9, concurrent=1, sleep=sleep, clock=lambda: now[0])
    answers = iter([ConnectionResetError("reset"), TimeoutError("timed out"), b"pixels"])

    def request():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert with_backoff(request, gate, "row 3") == b"pixels"
    pauses = [p for p in pauses if p > 1e-6]  # not the rate's nanosecond spacing
    assert len(pauses) == 2 and 0 < pauses[0] <= 1.0 and 0 < pauses[1] <= 2.0

    def always_down():
        raise ConnectionRefusedError("refused")

    before = now[0]
    with pytest.raises(
        TransientError, match="computePixels for row 3: ConnectionRefusedError: refused after"
    ):
        with_backoff(always_down, gate, "row 3")
    # MAX_ATTEMPTS tries, the pauses between them on the fake clock: at most 1 + 2 + … + 60 s
    assert 0 < now[0] - before <= sum(min(60, 2**n) for n in range(MAX_ATTEMPTS - 1))


CONNECT_HOOK = """

def _connects(event, args, log=os.environ["TRACE_DIR"], port=os.environ["TRACE_PORT"]):
    if event == "socket.connect" and isinstance(args[1], tuple) and str(args[1][1]) == port:
        import traceback

        callers = {frame.name for frame in traceback.extract_stack()}
        why = "credentials-check" if "check_access" in callers else "request"
        with open(os.path.join(log, str(os.getpid())), "a") as out:
            out.write(f"{os.getppid()} connect {why}\\n")

sys.addaudithook(_connects)
"""


@pytest.mark.integration
def test_the_workers_request_the_pixels_on_the_portable_runner(tmp_path, services):
    """`terrabeam run` on Beam's PortableRunner (job service + external worker pool on 127.0.0.1):
    the pool's SDK workers connect to Earth Engine (the playback) and publish the map tiles; the
    launcher never connects to it; the maps equal the in-process run's."""
    from conftest import assert_same_map
    from test_object_storage import _portable_run
    from test_portable_runner import _traced_env, _traced_opens

    config_path = _pixels_config(tmp_path, services, max_request_bytes=TWO_PATCHES - 1)
    assert main(["run", str(config_path), "--run", "local", "--window", WINDOW]) == 0
    env = _traced_env(tmp_path) | {"TRACE_PORT": str(services.server.server_port)}
    with (tmp_path / "trace-hook" / "sitecustomize.py").open("a") as hook:
        hook.write(CONNECT_HOOK)

    def write(document, name):
        (tmp_path / name).write_text(yaml.safe_dump(document))
        return tmp_path / name

    document = yaml.safe_load(config_path.read_text())
    worker_pool = _portable_run(tmp_path, write, document, env, ["run", "--run", "r", "--window", WINDOW])
    assert len(services.calls("POST", "/image:computePixels")) == 24  # 12 each run
    opens = _traced_opens(tmp_path)
    connects = [o for o in opens if o.mode == "connect"]
    by_workers = [o for o in connects if o.parent == worker_pool]
    assert by_workers and {o.path.name for o in by_workers} == {"request"}, (
        "pixels not requested by the workers"
    )
    # the launcher only checks the credentials before the run (a token request), nothing else
    assert {o.path.name for o in connects if o.parent != worker_pool} == {"credentials-check"}
    tiles = [
        o for o in opens if o.mode == "rename" and o.path.parent.name == "tiles" and o.path.suffix == ".tif"
    ]
    assert tiles and {o.parent for o in tiles} == {worker_pool}
    local, deliver = tmp_path / "ws" / "local" / "deliver", tmp_path / "ws" / "r" / "deliver"
    names = sorted(p.name for p in local.glob("*.tif"))
    assert names and sorted(p.name for p in deliver.glob("*.tif")) == names
    for name in names:
        assert_same_map(deliver / name, local / name)
