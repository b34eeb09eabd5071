"""The object tier: cold blobs in a local folder (the default) or an S3-compatible bucket.

Objects are named ``<prefix>/blocks/<32-hex-key>`` and hold ``codec.encode_cold`` blobs,
so the tier shares everything else with the SSD tier (``ColdTier``): the inventory is
rebuilt on open from each object's header, every read is verified, a corrupt object is
deleted. Writes are atomic in both stores: a temp file renamed into place, or one PUT.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from kvpool.codec import ColdCodec
from kvpool.errors import BadRequest, KVPoolError, TierFull, Unavailable
from kvpool.keys import BlockKey
from kvpool.tiers.base import TierKind
from kvpool.tiers.cold import BlobStore, ColdTier

log = logging.getLogger(__name__)
_HEX_NAME = re.compile(r"^[0-9a-f]{32}$")
_TMP = ".tmp-"


class _FolderStore:
    """``<root>/blocks/<hex>`` files; a write lands under its final name only when whole."""

    scan_threads = 8

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dir = root / "blocks"
        self._dir.mkdir(parents=True, exist_ok=True)

    def _path(self, key: BlockKey) -> Path:
        return self._dir / key.hex()

    def put(self, key: BlockKey, blob: bytes) -> None:
        tmp = self._dir / f"{_TMP}{key.hex()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(key))
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TierFull(f"no space left for the object tier in {self._dir}") from None
            raise KVPoolError(f"writing block {key.hex()} to {self._dir} failed: {exc}") from None

    def get(self, key: BlockKey) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def get_range(self, key: BlockKey, length: int) -> bytes | None:
        try:
            with open(self._path(key), "rb") as f:
                return f.read(length)
        except FileNotFoundError:
            return None

    def delete(self, key: BlockKey) -> bool:
        try:
            self._path(key).unlink()
            return True
        except FileNotFoundError:
            return False

    def list(self) -> Iterator[tuple[BlockKey, int]]:
        with os.scandir(self._dir) as entries:
            for entry in entries:
                if _HEX_NAME.match(entry.name):
                    try:
                        yield bytes.fromhex(entry.name), entry.stat().st_size
                    except FileNotFoundError:
                        continue
                elif entry.name.startswith(_TMP):  # left by a crash mid-write: never a block
                    log.info("removing unfinished object %s", entry.path)
                    Path(entry.path).unlink(missing_ok=True)

    def close(self) -> None:
        pass


class _S3Store:
    """``s3://bucket/<prefix>/blocks/<hex>`` objects; a PUT is atomic on its own."""

    scan_threads = 16

    def __init__(self, bucket: str, prefix: str, endpoint: str = "") -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self._dir = f"{prefix}/blocks/" if prefix else "blocks/"
        self._client: Any = boto3.session.Session().client(
            "s3", endpoint_url=endpoint or None,
            config=Config(max_pool_connections=32, retries={"max_attempts": 3, "mode": "standard"}))
        self._call("create the bucket", self._ensure_bucket)

    def _name(self, key: BlockKey) -> str:
        return self._dir + key.hex()

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        """Every S3 failure reaches the caller as a typed, retryable error."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kw)
        except ClientError as exc:
            raise Unavailable(f"S3 could not {what} in bucket {self.bucket}: {exc}") from None
        except BotoCoreError as exc:
            raise Unavailable(f"S3 could not {what} in bucket {self.bucket}: {exc}") from None

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
        region = self._client.meta.region_name
        kw: dict[str, Any] = {}
        if region and region != "us-east-1":
            kw["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(Bucket=self.bucket, **kw)
            log.info("created S3 bucket %s", self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou",):
                raise

    def put(self, key: BlockKey, blob: bytes) -> None:
        self._call(f"put {self._name(key)}", self._client.put_object,
                   Bucket=self.bucket, Key=self._name(key), Body=blob)

    def _get(self, key: BlockKey, **kw: Any) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._name(key), **kw)["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404"):
                return None
            if code == "InvalidRange":  # an empty object: no byte 0 to start from
                return b""
            raise

    def get(self, key: BlockKey) -> bytes | None:
        return self._call(f"get {self._name(key)}", self._get, key)

    def get_range(self, key: BlockKey, length: int) -> bytes | None:
        return self._call(f"get {self._name(key)}", self._get, key, Range=f"bytes=0-{length - 1}")

    def delete(self, key: BlockKey) -> bool:
        self._call(f"delete {self._name(key)}", self._client.delete_object,
                   Bucket=self.bucket, Key=self._name(key))
        return True  # S3 does not say whether it was there; callers only delete known keys

    def list(self) -> Iterator[tuple[BlockKey, int]]:
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._dir)
        for page in self._call(f"list {self._dir}", list, pages):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(self._dir):]
                if _HEX_NAME.match(name):
                    yield bytes.fromhex(name), int(obj["Size"])

    def close(self) -> None:
        self._client.close()


class ObjectTier(ColdTier):
    """The object tier; build one with ``ObjectTier.from_url``."""

    def __init__(self, store: BlobStore, url: str, capacity: int, codec: ColdCodec = ColdCodec(),
                 executor: ThreadPoolExecutor | None = None) -> None:
        self.url = url
        super().__init__(TierKind.OBJECT, store, capacity, codec, executor)

    @classmethod
    def from_url(cls, url: str, capacity: int, s3_endpoint: str = "", codec: ColdCodec = ColdCodec(),
                 executor: ThreadPoolExecutor | None = None) -> "ObjectTier":
        """``s3://bucket/prefix`` (the bucket is created if missing), ``file:///abs/path``
        or a plain path. S3 credentials come from the usual AWS environment variables."""
        parsed = urlparse(url)
        store: BlobStore
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise BadRequest(f"object tier url {url!r} names no bucket (s3://bucket/prefix)")
            store = _S3Store(parsed.netloc, parsed.path.strip("/"), s3_endpoint)
        elif parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise BadRequest(f"object tier url {url!r}: a file url needs an absolute path (file:///path)")
            store = _FolderStore(Path(parsed.path))
        elif parsed.scheme == "" and url:
            store = _FolderStore(Path(url))
        else:
            raise BadRequest(f"object tier url {url!r}: use s3://bucket/prefix, file:///path or a path")
        try:
            return cls(store, url, capacity, codec, executor)
        except BaseException:
            store.close()
            raise
