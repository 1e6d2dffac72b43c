"""Files under a local or s3:// root: atomic writes, and failures that name the path and the setting to fix.

S3 is configured the way botocore reads it, from the environment: AWS_ENDPOINT_URL (an
S3-compatible server such as MinIO; unset means AWS itself), AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY (or any other source of botocore's credential chain). No Dagster import.
"""

import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path

from upath import UPath


class StorageError(RuntimeError):
    """A storage location that cannot be used, with what to change."""


def is_local(path: UPath) -> bool:
    return path.protocol in ("", "file", "local")


def write_atomic(path: UPath, payload: bytes, setting: str = "NEURON_ASSETS_STORAGE") -> None:
    """Readers see the old file or the whole new one, never a part: locally a temp file in the
    same folder then a rename; on an object store a single PUT, which is atomic. A local write
    that fails (full disk, no permission) is a StorageError naming the path and `setting`, and
    leaves the old file as it was."""
    if not is_local(path):
        with s3_errors(str(path), "write", setting):
            path.write_bytes(payload)
        return
    target = Path(path.path)
    temp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        if not target.parent.is_dir():  # a stat: far cheaper than a mkdir that finds the folder there
            target.parent.mkdir(parents=True, exist_ok=True)
        try:
            # os.open applies the umask, as any other new file gets it (tempfile.mkstemp forces 0600).
            with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
                f.write(payload)
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)  # the part written, whose space the message must not count as used
            raise
    except OSError as error:
        raise write_failure(target, len(payload), error, setting) from None


def _size(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            break
        n /= 1024
    else:
        unit = "TiB"
    return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"


def write_failure(target: Path, size: int, error: Exception, setting: str) -> StorageError:
    """A failed local write of `size` bytes to `target` (the part written already removed): what
    failed, where, and what to change: free space for a full disk, the folder for a refused one,
    the size limit for a file too large."""
    target = target.absolute()  # a relative storage root means little to whoever reads the log
    code = getattr(error, "errno", None)
    what = f"cannot write {target} ({_size(size)}): {getattr(error, 'strerror', None) or error}"
    if code == errno.EFBIG:
        return StorageError(f"{what}; the file is larger than this process (ulimit -f) or the file system "
                            f"allows. Raise the limit, or set {setting} to another file system.")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"{what}. Make {target.parent} writable by this user, or set {setting} to a "
                            "writable location.")
    folder = next(p for p in target.parents if p.exists())  # on the file system of the target
    free = shutil.disk_usage(folder).free
    # Some writers (safetensors) report a full disk without an errno: less room than the write is one too.
    if code in (errno.ENOSPC, errno.EDQUOT) or free < size:
        return StorageError(f"{what}; {_size(free)} free on the file system of {folder}. "
                            f"Free some space there, or set {setting} to a location with room.")
    return StorageError(f"{what}. Check {setting} and the file system it points to.")


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
