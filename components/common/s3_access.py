"""How this process reaches S3: a boto3 client, and a pyarrow file system for Ray Train's storage,
both from the standard AWS environment (credentials, ``AWS_ENDPOINT_URL``, region), never from
pipeline YAML."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow.fs


def s3_client():
    """A boto3 S3 client from the standard AWS environment, with adaptive retries on throttling
    and transient errors. ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) selects an
    S3-compatible server; boto3 reads it itself."""
    import boto3
    from botocore.config import Config

    retries = {"max_attempts": int(os.environ.get("LATENTFLOW_S3_MAX_ATTEMPTS", "8")), "mode": "adaptive"}
    return boto3.client("s3", config=Config(retries=retries, connect_timeout=10, read_timeout=120))


def s3_credentials_available() -> bool:
    import boto3

    return boto3.session.Session().get_credentials() is not None


def s3_filesystem() -> "pyarrow.fs.S3FileSystem":
    """A pyarrow S3 file system from the standard AWS environment. ``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL`` selects an S3-compatible server (MinIO, moto), as boto3 does."""
    from pyarrow import fs

    kwargs: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, sep, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host.rstrip("/") if sep else endpoint
        kwargs["scheme"] = scheme if sep else "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return fs.S3FileSystem(**kwargs)


def arrow_filesystem(uri: str) -> tuple["pyarrow.fs.FileSystem | None", str]:
    """(file system, path inside it) for a local path or s3:// URI; None means "local, let the
    library decide". Ray Train's RunConfig takes this pair."""
    if uri.startswith("s3://"):
        return s3_filesystem(), uri.removeprefix("s3://").rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI scheme: {uri!r} (use a local path or s3://)")
    return None, os.path.abspath(uri.removeprefix("file://"))
