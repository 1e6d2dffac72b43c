"""Files under a local or s3:// root: atomic writes, and S3 failures that name the setting to fix.

S3 is configured the way botocore reads it, from the environment: AWS_ENDPOINT_URL (an
S3-compatible server such as MinIO; unset means AWS itself), AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY (or any other source of botocore's credential chain). No Dagster import.
"""

import contextlib
import os
import tempfile
from pathlib import Path

from upath import UPath


class StorageError(RuntimeError):
    """A storage location that cannot be used, with what to change."""


def is_local(path: UPath) -> bool:
    return path.protocol in ("", "file", "local")


def write_atomic(path: UPath, payload: bytes) -> None:
    """Readers see the old file or the whole new one, never a part: locally a temp file in the
    same folder then a rename; on an object store a single PUT, which is atomic."""
    if not is_local(path):
        with s3_errors(str(path), "write"):
            path.write_bytes(payload)
        return
    folder = Path(path.path).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{Path(path.path).name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(temp, path.path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL") or "AWS (AWS_ENDPOINT_URL is unset)"


@contextlib.contextmanager
def s3_errors(url: str, action: str, setting: str = "NEURON_ASSETS_STORAGE"):
    """Turn botocore/s3fs failures on `url` into a StorageError naming the setting to fix."""
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, PartialCredentialsError

    try:
        yield
    except (EndpointConnectionError, ConnectionError, TimeoutError) as e:
        raise StorageError(
            f"cannot {action} {url}: the S3 endpoint {_endpoint()} does not answer ({e}). "
            "Check AWS_ENDPOINT_URL and that the server is running."
        ) from None
    except (NoCredentialsError, PartialCredentialsError) as e:
        raise StorageError(
            f"cannot {action} {url}: no S3 credentials ({e}). Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
        ) from None
    except PermissionError as e:
        raise StorageError(
            f"cannot {action} {url}: S3 at {_endpoint()} refused the credentials ({e}). "
            "Check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that they may read and write this bucket."
        ) from None
    except FileNotFoundError as e:
        if "bucket" not in str(e).lower():
            raise
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        raise StorageError(
            f"cannot {action} {url}: the bucket {bucket!r} does not exist at {_endpoint()}. "
            f"Create it (aws s3 mb s3://{bucket}) or change {setting}."
        ) from None


def check_s3_root(url: str, setting: str = "NEURON_ASSETS_STORAGE") -> None:
    """Fail fast, before any work, when an s3:// root is unreachable, refused or has no bucket."""
    root = UPath(url)
    if is_local(root):
        return
    bucket = root.path.split("/", 1)[0]
    with s3_errors(url, "use", setting):
        root.fs.invalidate_cache()
        root.fs.ls(bucket, refresh=True)
