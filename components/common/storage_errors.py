"""What a storage failure means: ``StorageError`` (missing, transient, or "cannot tell"), and
the reading of boto3/botocore's errors as one. Imports no storage backend, so every backend and
the storage interface can share it."""

from __future__ import annotations


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI at fault.

    ``missing``: the object is not there (and the storage said so): the one answer a cache check
    may read as "no result". Every other error (unreachable, denied, throttled) means "cannot tell".
    ``transient``: the kind of failure that can pass (an unreachable endpoint, a timeout,
    throttling, a 5xx), worth retrying; a missing object or denied access is not."""

    def __init__(self, message: str, transient: bool = False, missing: bool = False):
        super().__init__(message)
        self.transient, self.missing = transient, missing


TRANSIENT_S3_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                                "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "500", "502",
                                "503", "504"})


def s3_storage_error(what: str, uri: str, bucket: str, error: Exception) -> Exception:
    """The StorageError, naming the object at ``uri``, that a boto3/botocore error means (others
    unchanged)."""
    from boto3.exceptions import Boto3Error  # s3transfer's "failed after retries"
    from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError, EndpointConnectionError,
                                     NoCredentialsError)

    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket",):
            return StorageError(f"{what} {uri}: bucket {bucket!r} does not exist")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{what} {uri}: access denied ({code}); check the AWS credentials")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{what} {uri}: not found", missing=True)
        return StorageError(f"{what} {uri}: {code or error}", transient=code in TRANSIENT_S3_CODES)
    if isinstance(error, NoCredentialsError):
        return StorageError(f"{what} {uri}: no AWS credentials in the environment")
    if isinstance(error, EndpointConnectionError):
        return StorageError(f"{what} {uri}: S3 endpoint unreachable ({error})", transient=True)
    if isinstance(error, (ConnectionError, BotoCoreError, Boto3Error)):  # reset, timed out, cut off mid-body
        return StorageError(f"{what} {uri}: {type(error).__name__}: {error}", transient=True)
    return error
