"""A real STAC API on 127.0.0.1 for the integration tests: PostgreSQL + PostGIS with pgstac in a
temporary folder, stac-fastapi-pgstac (transactions on) under uvicorn, and asset file servers with
HTTP Range requests (GDAL's /vsicurl/ reads by range; Python's http.server has none).

``python stac_services.py check`` prints the PostgreSQL bin folder or what is missing (exit 1); `make
test` runs it before installing PostgreSQL. ``python stac_services.py serve FD stac|assets [DIR]``
serves on the listening socket FD, bound by the parent (so no port is picked twice).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START_TIMEOUT = 60  # seconds for a server to answer
# What `make test` installs when PostgreSQL or PostGIS is missing (Debian and Ubuntu metapackages;
# on bookworm: postgresql-15 and postgresql-15-postgis-3).
APT_PACKAGES = "postgresql postgresql-postgis"
SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres", "pg_config")
SUPERUSER = "terrabeam"
# Loopback services only: a proxy from the environment could never reach them.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PostgisMissing(RuntimeError):
    """No PostgreSQL server binaries with the PostGIS extension on this machine."""


class ServiceFailed(RuntimeError):
    """A server did not start, or refused a request; the message carries its log or answer."""


def postgres_bindir() -> Path:
    """The bin folder of a PostgreSQL server with PostGIS: `pg_config --bindir`, else the newest
    /usr/lib/postgresql/*/bin (Debian and Ubuntu install the servers there, off PATH)."""
    candidates = []
    if pg_config := shutil.which("pg_config"):
        done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if done.returncode == 0:
            candidates.append(Path(done.stdout.strip()))

    def version(bindir: Path) -> list[int]:
        return [int(n) for n in re.findall(r"\d+", bindir.parent.name)]

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    problems = []
    for bindir in dict.fromkeys(candidates):
        missing = [name for name in SERVER_PROGRAMS if not (bindir / name).exists()]
        if missing:
            problems.append(f"{bindir} has no {', '.join(missing)}")
            continue
        sharedir = subprocess.run([bindir / "pg_config", "--sharedir"], capture_output=True, text=True)
        control = Path(sharedir.stdout.strip()) / "extension" / "postgis.control"
        if control.exists():
            return bindir
        problems.append(f"PostGIS is not installed for {bindir} ({control} missing)")
    found = "; ".join(problems) or "no pg_config on PATH, no /usr/lib/postgresql/*/bin"
    raise PostgisMissing(f"PostgreSQL server with PostGIS not found: {found}")


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def _free_port() -> int:
    with _listening_socket() as sock:
        return sock.getsockname()[1]


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"


def _run(command: list[str | Path], what: str, log: Path | None = None, **kwargs: Any) -> str:
    """stdout of command; its output (and the tail of log) in the error if it fails."""
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-3000:] + (f"\n{log}: {_log_tail(log)}" if log else "")
        raise ServiceFailed(f"{what} failed (exit {done.returncode}): {output}")
    return done.stdout


@dataclass(frozen=True)
class Database:
    """A running PostgreSQL server: reach it at 127.0.0.1:port as SUPERUSER with password."""

    port: int
    password: str
    name: str = "postgres"

    @property
    def dsn(self) -> str:  # without the password: libpq and asyncpg take it from PGPASSWORD
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{self.name}"

    def environment(self) -> dict[str, str]:
        return {
            "PGUSER": SUPERUSER,
            "PGPASSWORD": self.password,
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.port),
            "PGDATABASE": self.name,
        }


@contextmanager
def postgres(bindir: Path, folder: Path) -> Iterator[Database]:
    """A PostgreSQL server of its own in folder (data, unix socket, log), on a free port of
    127.0.0.1 with a random password (trust only on its unix socket), stopped on exit.

    As root, the server runs as the `postgres` user (PostgreSQL refuses to run as root), so folder
    is handed to that user."""
    as_owner: dict[str, Any] = {}
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise ServiceFailed("no `postgres` user to run PostgreSQL as (it refuses root)") from None
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_owner = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
    data, log, password = folder / "data", folder / "postgres.log", secrets.token_urlsafe(24)
    password_file = folder / "password"
    password_file.touch(mode=0o600)
    password_file.write_text(password)
    if as_owner:
        os.chown(password_file, as_owner["user"], as_owner["group"])
    initdb = [bindir / "initdb", "-D", data, "-U", SUPERUSER, f"--pwfile={password_file}"]
    initdb += ["--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"]
    _run(initdb, "initdb", **as_owner)
    password_file.unlink()
    port = _free_port()
    settings = {
        "listen_addresses": "'127.0.0.1'",
        "port": str(port),
        "unix_socket_directories": f"'{folder}'",
        # A throwaway database: durability buys nothing and costs start-up and load time.
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
    }
    with (data / "postgresql.conf").open("a") as conf:
        conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
    pg_ctl = [bindir / "pg_ctl", "-D", data, "-l", log, "-s"]
    try:
        _run([*pg_ctl, "-w", "-t", str(START_TIMEOUT), "start"], "PostgreSQL start", log, **as_owner)
        yield Database(port=port, password=password)
    finally:
        # immediate: no shutdown checkpoint, the data is thrown away
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, **as_owner)


def install_pgstac(database: Database) -> str:
    """`pypgstac migrate`: the pgstac schema of the installed pypgstac (it creates the postgis,
    btree_gist and unaccent extensions). Returns the pgstac version."""
    command = [sys.executable, "-m", "pypgstac.pypgstac", "migrate", f"--dsn={database.dsn}"]
    return _run(command, "pypgstac migrate", env={**os.environ, **database.environment()}).strip()


def _wait_for_http(url: str, process: subprocess.Popen, log: Path) -> None:
    """Until GET url answers; a client error (say 404) is an answer, a server error is a failure."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            _http.open(url, timeout=5).close()
            return
        except urllib.error.HTTPError as error:
            if error.code < 500:
                return
            raise ServiceFailed(f"GET {url}: HTTP {error.code}: {_log_tail(log)}") from None
        except OSError:
            if process.poll() is not None:
                raise ServiceFailed(
                    f"server for {url} exited ({process.returncode}): {_log_tail(log)}"
                ) from None
            if time.monotonic() > deadline:
                raise ServiceFailed(
                    f"server for {url} not answering after {START_TIMEOUT} s: {_log_tail(log)}"
                ) from None
            time.sleep(0.1)


@contextmanager
def http_server(
    kind: str, arguments: list[str], folder: Path, ready_path: str = "/", env: dict[str, str] | None = None
) -> Iterator[str]:
    """Base URL of `serve FD kind arguments…` in a child process, once GET ready_path answers; its
    output goes to folder/<kind>.log, it runs in folder (no stray .env is read) and is stopped on
    exit."""
    log = folder / f"{kind}.log"
    with _listening_socket() as sock, log.open("w") as output:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        process = subprocess.Popen(
            [sys.executable, __file__, "serve", str(sock.fileno()), kind, *arguments],
            pass_fds=[sock.fileno()],
            env=env,
            cwd=folder,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal reaches pytest only, which stops it
        )
    try:
        _wait_for_http(url + ready_path, process, log)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def stac_server(bindir: Path) -> Iterator[str]:
    """URL of stac-fastapi-pgstac, transactions enabled, over its own PostgreSQL + pgstac; all in a
    temporary folder, removed on exit. It lies in the system's temporary folder, not pytest's,
    which only its owner may enter: as root, PostgreSQL runs as another user."""
    folder = Path(tempfile.mkdtemp(prefix="terrabeam-stac-"))
    try:
        with postgres(bindir, folder) as database:
            install_pgstac(database)
            env = {key: value for key, value in os.environ.items() if key != "ENABLED_EXTENSIONS"}
            env |= database.environment() | {"ENABLE_TRANSACTIONS_EXTENSIONS": "true"}
            # It answers once its lifespan has opened its connection pools to the database.
            with http_server("stac", [], folder, "/_mgmt/ping", env) as url:
                yield url
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def asset_server(directory: Path) -> Iterator[str]:
    """Base URL of a server of the files under directory (GET and HEAD, Range requests: starlette's
    StaticFiles under uvicorn); `<url>/<relative path>` is a file."""
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise FileNotFoundError(f"asset server: {directory} is not a folder")
    with (
        tempfile.TemporaryDirectory(prefix="terrabeam-assets-") as folder,
        http_server("assets", [str(directory)], Path(folder)) as url,
    ):
        yield url


def _send(method: str, url: str, document: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(document).encode(), method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with _http.open(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        answer = error.read()[:1000].decode(errors="replace")
        raise ServiceFailed(f"{method} {url}: HTTP {error.code}: {answer}") from None


def load(api_url: str, collection: dict, items: list[dict]) -> None:
    """POST a collection, then each item into it, through the Transactions extension."""
    _send("POST", f"{api_url}/collections", collection)
    items_url = f"{api_url}/collections/{collection['id']}/items"
    for item in items:
        _send("POST", items_url, item | {"collection": collection["id"]})


def serve(fd: int, kind: str, arguments: list[str]) -> None:
    import uvicorn

    if kind == "stac":  # settings from the environment (PG*, ENABLE_TRANSACTIONS_EXTENSIONS)
        from stac_fastapi.pgstac.app import create_app

        app, lifespan = create_app(), "on"
    elif kind == "assets":  # in an application, which turns a missing file into a 404
        from starlette.applications import Starlette
        from starlette.routing import Mount
        from starlette.staticfiles import StaticFiles

        app, lifespan = Starlette(routes=[Mount("/", StaticFiles(directory=arguments[0]))]), "off"
    else:
        raise SystemExit(f"unknown server {kind!r}: stac or assets")
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan=lifespan)
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=fd)])


if __name__ == "__main__":
    if sys.argv[1:2] == ["check"]:
        try:
            print(f"PostgreSQL with PostGIS: {postgres_bindir()}")
        except PostgisMissing as error:
            raise SystemExit(f"{error}. As root: apt-get install {APT_PACKAGES}") from None
    elif sys.argv[1:2] == ["serve"]:
        serve(int(sys.argv[2]), sys.argv[3], sys.argv[4:])
    else:
        raise SystemExit("usage: stac_services.py check | serve FD stac|assets [DIR]")
