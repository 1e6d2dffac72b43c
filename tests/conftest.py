import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

# Tests never reach a model hub: everything is built in-process or shipped in a wheel.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def s3(monkeypatch):
    """A bucket on a real S3-compatible server, reached only through AWS_* variables set here."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    import requests
    import s3fs
    from services import s3_server

    with s3_server() as endpoint:
        requests.post(f"{endpoint}/moto-api/reset").raise_for_status()  # moto's state is per process
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "scale-out-test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "scale-out-test-secret")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # an unreachable endpoint fails in seconds
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("study")
        yield fs
        s3fs.S3FileSystem.clear_instance_cache()
