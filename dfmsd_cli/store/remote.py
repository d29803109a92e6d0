"""Stores on object storage (``s3://``, ``gs://``, ... through fsspec): open, check, explain.

A store URL is opened as a zarr ``FsspecStore`` over the backend's async filesystem (s3fs,
gcsfs, adlfs). The endpoint and credentials come from where the backend looks for them, as
for any fsspec user: for S3 the AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``), fsspec's own
``FSSPEC_S3_ENDPOINT_URL`` / ``FSSPEC_S3_KEY`` / ``FSSPEC_S3_SECRET`` or its config files
(docs/object_storage.md).

Before the first use of a URL in a process, :func:`preflight` asks the backend for the
bucket once, so a missing backend package, a missing bucket, refused credentials or an
unreachable endpoint end with one line naming the fix (exit 2) instead of a botocore traceback
(or minutes of retries). Requests are concurrent (``store/chunks.py``) and bounded by
``concurrency`` (the HTTP connection pool of s3fs; ``DFMSD_STORE_CONCURRENCY``, default 64).
"""

from __future__ import annotations

import os
from typing import Any

from dfmsd_cli.errors import UserError

# protocol -> the package that implements it and how to install it
BACKENDS = {
    "s3": ("s3fs", "pip install 'dfmsd[s3]'"),
    "s3a": ("s3fs", "pip install 'dfmsd[s3]'"),
    "gs": ("gcsfs", "pip install gcsfs"),
    "gcs": ("gcsfs", "pip install gcsfs"),
    "az": ("adlfs", "pip install adlfs"),
    "abfs": ("adlfs", "pip install adlfs"),
}
DEFAULT_CONCURRENCY = 64
# bounded retries: an unreachable endpoint fails in seconds, not after minutes of backoff
_S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}}
_checked: set[tuple[str, str]] = set()


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def protocol(url: str) -> str:
    return str(url).split("://", 1)[0].lower()


def concurrency_default() -> int:
    """``DFMSD_STORE_CONCURRENCY`` or 64: the most requests in flight per process."""
    raw = os.environ.get("DFMSD_STORE_CONCURRENCY", "")
    try:
        n = int(raw) if raw else DEFAULT_CONCURRENCY
    except ValueError:
        raise UserError(
            f"DFMSD_STORE_CONCURRENCY must be a positive integer, got '{raw}': fix or unset it"
        ) from None
    if n < 1:
        raise UserError(f"DFMSD_STORE_CONCURRENCY must be >= 1, got {n}: fix or unset it")
    return n


def storage_options(url: str, concurrency: int | None = None) -> dict[str, Any]:
    """fsspec options for ``url``: a connection pool of ``concurrency`` and bounded retries on
    S3; nothing for other backends (their own defaults and configuration apply)."""
    if protocol(url) not in ("s3", "s3a"):
        return {}
    n = concurrency or concurrency_default()
    return {
        "config_kwargs": {**_S3_CONFIG, "max_pool_connections": n},
        # s3fs splits a large GET into parts only after a HEAD for its size: one more round
        # trip per chunk (measured: every GET preceded by a HEAD); chunks are one image each
        "max_concurrency": 1,
        "asynchronous": True,
    }


def filesystem_class(url: str):
    """The fsspec filesystem class of ``url``; a missing backend package is a UserError."""
    import fsspec

    proto = protocol(url)
    try:
        return fsspec.get_filesystem_class(proto)
    except ImportError as exc:
        pkg, cmd = BACKENDS.get(proto, (f"the fsspec backend for {proto}://", None))
        how = cmd or f"install the fsspec implementation of {proto}://"
        raise UserError(
            f"store {url} is on {proto}:// storage, which needs the package {pkg}: {how}"
        ) from exc
    except ValueError as exc:
        raise UserError(f"store {url}: unknown storage protocol '{proto}://' ({exc})") from exc


def open_zarr_store(url: str, mode: str = "r", concurrency: int | None = None):
    """A zarr ``FsspecStore`` for ``url`` (read-only for mode 'r'), after :func:`preflight`."""
    from zarr.storage import FsspecStore

    preflight(url)
    opts = storage_options(url, concurrency)
    with remote_errors(url):
        return FsspecStore.from_url(url, storage_options=opts or None, read_only=mode == "r")


def _where(url: str) -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    endpoint = endpoint or os.environ.get("FSSPEC_S3_ENDPOINT_URL")
    return f" at endpoint {endpoint}" if endpoint and protocol(url) in ("s3", "s3a") else ""


def explain(url: str, exc: BaseException) -> UserError | None:
    """The one-line error for a backend failure on ``url``, or None when it is not one of the
    known kinds (missing bucket, refused credentials, unreachable endpoint)."""
    bucket = str(url).split("://", 1)[1].split("/", 1)[0]
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    names = {type(e).__name__ for e in _chain(exc)}
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return UserError(
            f"no credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE) for the store's endpoint"
        )
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                "ConnectionRefusedError", "ServerDisconnectedError"} or (
        "could not connect" in low or "connection refused" in low
    ):  # fmt: skip
        return UserError(
            f"cannot reach the object store of {url}{_where(url)} ({_short(exc)}): check the "
            "endpoint (AWS_ENDPOINT_URL or FSSPEC_S3_ENDPOINT_URL) and the network, then run the "
            "same command again (it resumes)"
        )
    if any(k in low for k in ("invalidaccesskeyid", "signaturedoesnotmatch", "access denied",
                              "accessdenied", "forbidden", "invalidtoken", "expiredtoken")) or (
        isinstance(exc, PermissionError)
    ):  # fmt: skip
        return UserError(
            f"access to {url}{_where(url)} was refused ({_short(exc)}): check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket's policy"
        )
    if "nosuchbucket" in low or "bucket does not exist" in low:
        return UserError(
            f"bucket '{bucket}' does not exist{_where(url)}: create it (e.g. 'aws s3 mb "
            f"s3://{bucket}') or point --cache at an existing bucket"
        )
    return None


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _short(exc: BaseException) -> str:
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


class remote_errors:  # noqa: N801 - used as a context manager
    """Re-raise a known backend failure on ``url`` as its one-line ``UserError``."""

    def __init__(self, url: str):
        self.url = url

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, UserError) or not isinstance(exc, Exception):
            return False
        err = explain(self.url, exc)
        if err is not None:
            raise err from exc
        return False


def preflight(url: str) -> None:
    """Ask the backend for the bucket of ``url`` once per process: a missing package, a
    missing bucket, refused credentials or an unreachable endpoint become one-line errors."""
    proto = protocol(url)
    cls = filesystem_class(url)
    if proto not in ("s3", "s3a"):
        return  # other backends: their first request reports (remote_errors still applies)
    bucket = str(url).split("://", 1)[1].split("/", 1)[0]
    key = (proto, bucket)
    if key in _checked:
        return
    opts = storage_options(url)
    opts.pop("asynchronous", None)
    fs = cls(**opts)
    with remote_errors(url):
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError as exc:
            raise UserError(
                f"bucket '{bucket}' does not exist{_where(url)}: create it (e.g. 'aws s3 mb "
                f"s3://{bucket}') or point --cache at an existing bucket"
            ) from exc
    _checked.add(key)
