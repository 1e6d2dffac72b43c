"""Real servers on loopback for the scale-out tests: PostgreSQL (Debian's package, which `make
test` installs) in a throwaway data directory, and an S3-compatible server (moto's server mode)."""

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_USER, PG_PASSWORD, PG_DB = "unit", "pg-test-password-81", "dagster"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: `make test` installs Debian's postgresql package")
    return found[-1].parent


def _wait_for_postgres(env: dict, seconds: float = 60) -> None:
    import psycopg2

    deadline = time.monotonic() + seconds
    while True:
        try:
            psycopg2.connect(host=env["NEURON_ASSETS_PG_HOST"], port=env["NEURON_ASSETS_PG_PORT"], user=PG_USER,
                             password=PG_PASSWORD, dbname="postgres").close()
            return
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@contextlib.contextmanager
def postgres_server():
    """A PostgreSQL server on 127.0.0.1 with a password user and an empty `dagster` database;
    yields the NEURON_ASSETS_PG_* variables that reach it."""
    import psycopg2

    bindir = _postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="neuron-assets-pg-"))
    # PostgreSQL refuses to run as root: as root, the server runs as Debian's postgres user.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    (root / "password").write_text(PG_PASSWORD)
    if as_user:
        shutil.chown(root, "postgres")
        shutil.chown(root / "password", "postgres")
    subprocess.run([*as_user, bindir / "initdb", "-D", root / "data", "-U", PG_USER, "--auth=scram-sha-256",
                    f"--pwfile={root / 'password'}", "-E", "UTF8"], check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen([*as_user, bindir / "postgres", "-D", root / "data", "-p", str(port),
                               "-h", "127.0.0.1", "-k", root], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"NEURON_ASSETS_PG_HOST": "127.0.0.1", "NEURON_ASSETS_PG_PORT": str(port),
           "NEURON_ASSETS_PG_USER": PG_USER, "NEURON_ASSETS_PG_PASSWORD": PG_PASSWORD, "NEURON_ASSETS_PG_DB": PG_DB}
    try:
        _wait_for_postgres(env)
        connection = psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, password=PG_PASSWORD,
                                      dbname="postgres")
        connection.autocommit = True
        connection.cursor().execute(f"CREATE DATABASE {PG_DB}")
        connection.close()
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def s3_server():
    """moto's S3 server on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
