"""Which location a store URL names: ``s3://bucket/prefix`` or a folder path (also ``file://``). Any other
scheme is refused: ``gs://x`` or ``s3:/x`` must not become a local folder named after it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from actstore.store.bucket import Bucket
from actstore.store.folder import Folder
from actstore.store.location import Location, UnsupportedLocation

SCHEMES = ("s3",)


def locate(root: str | os.PathLike[str] | Location, storage_options: dict[str, Any] | None = None) -> Location:
    """The location ``root`` names: ``s3://bucket/prefix`` or a folder path (also ``file://``)."""
    if isinstance(root, Location):
        return root
    text = os.fspath(root)
    scheme, sep, rest = text.partition("://")
    if not sep:
        if text.startswith("s3:"):  # a slash missing: refused rather than taken for a folder named "s3:"
            raise UnsupportedLocation(f"store {text!r}: write s3://bucket/prefix")
        return Folder(Path(text))
    if scheme == "file":
        return Folder(Path(rest))
    if scheme == "s3":
        bucket, _, prefix = rest.strip("/").partition("/")
        if not bucket:
            raise UnsupportedLocation(f"store {text!r} names no bucket: write s3://bucket/prefix")
        return Bucket(bucket, prefix.strip("/"), storage_options or {})
    raise UnsupportedLocation(
        f"store {text!r}: unsupported scheme {scheme}://; a store is a folder or "
        f"s3://bucket/prefix (any S3-compatible service, endpoint from AWS_ENDPOINT_URL)"
    )
