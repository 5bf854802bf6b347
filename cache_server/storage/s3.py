"""CAS blobs and records in an S3 bucket (AWS S3 or any S3-compatible store).

Layout under the bucket's prefix:
    cas/ab/<hash>            blobs, sharded by the first two hex digits
    records/<namespace>/<k>  records, k being the percent-encoded key

Many server replicas may share one bucket. Content is checked both ways: a
blob reaches S3 only after its SHA-256 and size matched (a multipart upload is
completed, and so becomes visible, only then), and what comes back is checked
again (whole reads by hash, ranged reads by length), so a cut connection or a
broken proxy can cause an error but never wrong bytes.

Credentials come only from boto3's standard chain (environment, profile,
instance role). Retries on 5xx, throttling and timeouts are botocore's; what
still fails becomes StoreUnavailable, which the services turn into UNAVAILABLE.
Objects expire only through the bucket's lifecycle rules (S3 has no access
time). The server puts an existence cache in front (storage/existence_cache.py,
`known_present_*` below); keep its TTL well below the expiry age.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import boto3
import botocore.config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from slipstream.cache_server.storage.base import (
    BlobWriter,
    Chunk,
    RecordInfo,
    Store,
    StoreUnavailable,
    X,
    Y,
    decode_record_key,
    encode_record_key,
)
from slipstream.cache_server.storage.fair_pool import FairPool
from slipstream.core.digests import EMPTY_BLOB, BlobId, DigestError, verify

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)
T = TypeVar("T")

PART_SIZE = 8 << 20  # multipart part size; also the largest single PutObject
WHOLE_READ_LIMIT = 8 << 20  # read_blob fetches and verifies smaller blobs whole
# Bytes per ranged GET when streaming a large blob. Large: every GET costs a request
# (and S3-compatible stores such as moto pay per range), and a body cut short is
# resumed from where it stopped anyway.
READ_WINDOW = 256 << 20
# How long CompleteMultipartUpload may take to answer. S3 assembles the parts before it
# answers, which "could take several minutes" for a large object (AWS's documentation);
# with the ordinary read timeout a large Complete timed out and was retried while the first
# was still assembling, and moto answers such a retry with a 500 until the retries run out.
COMPLETE_TIMEOUT = 600.0
_BODY_ATTEMPTS = 4  # body reads cut mid-way are resumed this often (botocore does not)
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")


class BucketError(OSError):
    """The bucket cannot be used at start (absent, forbidden, unreachable): a start-up error."""


@dataclass(frozen=True, slots=True)
class S3Config:
    bucket: str
    prefix: str = ""  # "" or ending in "/"
    endpoint_url: str | None = None
    region: str | None = None
    addressing: Literal["auto", "path", "virtual"] = "auto"
    max_attempts: int = 5
    retry_mode: Literal["standard", "adaptive"] = "standard"
    timeout: float = 10.0  # connect and read timeout, seconds
    request_threads: int = 16  # batch calls' S3 requests in flight, all batches together
    known_present_entries: int = 500_000
    known_present_ttl: float = 6 * 3600.0
    read_window: int = READ_WINDOW

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) from s3://BUCKET[/PREFIX]; the prefix is "" or ends in "/"."""
    if not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not an s3://BUCKET[/PREFIX] address")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"{bucket!r} is not a valid S3 bucket name")
    prefix = prefix.strip("/")
    if ".." in prefix.split("/") or "//" in prefix:
        raise ValueError(f"prefix {prefix!r} is not valid")
    return bucket, f"{prefix}/" if prefix else ""


def blob_key(prefix: str, blob: BlobId) -> str:
    return f"{prefix}cas/{blob.hash[:2]}/{blob.hash}"


def record_key(prefix: str, namespace: str, key: str) -> str:
    return f"{prefix}records/{namespace}/{encode_record_key(namespace, key)}"


def windows(offset: int, end: int, window: int) -> list[tuple[int, int]]:
    """Inclusive byte ranges of at most window bytes covering [offset, end)."""
    return [(start, min(start + window, end) - 1) for start in range(offset, end, window)]


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_missing(exc: ClientError) -> bool:
    return _code(exc) in _MISSING_CODES


class S3Store(Store):
    """CAS and records in one bucket under a prefix; see the module docstring."""

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self.prefix = config.prefix
        self.bucket = config.bucket
        boto_config = botocore.config.Config(
            retries={"mode": config.retry_mode, "max_attempts": config.max_attempts},
            connect_timeout=config.timeout,
            read_timeout=config.timeout,
            max_pool_connections=config.request_threads + 48,
            s3={"addressing_style": config.addressing},
            # Blobs are checked end to end against their SHA-256 and records against
            # their own checksum, so botocore's CRC32 on every body would only cost CPU
            # here and at the store, and some S3-compatible stores refuse it.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session()
        self.client: S3Client = session.client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            config=boto_config,
        )
        # Only for CompleteMultipartUpload (COMPLETE_TIMEOUT).
        self.complete_client: S3Client = session.client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            config=boto_config.merge(
                botocore.config.Config(
                    read_timeout=max(config.timeout, COMPLETE_TIMEOUT),
                    max_pool_connections=config.request_threads,
                )
            ),
        )
        self._counts: collections.Counter[str] = collections.Counter()
        self._counts_lock = threading.Lock()
        for client in (self.client, self.complete_client):
            client.meta.events.register("before-send.s3", self._count_request)
        self._pool = FairPool(config.request_threads, "s3-request")
        self._hash_pool = ThreadPoolExecutor(4, thread_name_prefix="s3-hash")

    # ---- accounting and errors ----
    def _count_request(self, event_name: str = "", **_: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        with self._counts_lock:
            self._counts[operation] += 1

    def request_counts(self) -> dict[str, int]:
        """HTTP requests sent to S3 so far, retries included, by S3 operation."""
        with self._counts_lock:
            return dict(self._counts)

    def _unavailable(self, what: str, exc: Exception) -> StoreUnavailable:
        detail = " ".join(str(exc).split())[:300]
        return StoreUnavailable(f"S3 bucket {self.config.describe()}: cannot {what}: {detail}")

    def _call(self, what: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """One S3 API call; ClientErrors pass through, transport errors become StoreUnavailable."""
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            if _is_missing(exc) or _code(exc) in ("PreconditionFailed", "412", "NoSuchUpload"):
                raise
            raise self._unavailable(what, exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable(what, exc) from exc

    def check_bucket(self) -> None:
        """Fail start-up (BucketError) unless the bucket can be used right now.

        Absent, forbidden, unreachable or without credentials alike: a server that
        cannot reach its storage at start is most often configured wrong (endpoint,
        network, credentials), and a process manager restarts it with backoff.
        """
        where = self.config.describe()
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = _code(exc)
            if code in ("404", "NoSuchBucket"):
                reason = "does not exist"
            elif code in ("403", "AccessDenied", "400"):
                reason = f"is not usable ({code})"
            else:
                reason = f"cannot be checked ({' '.join(str(exc).split())[:200]})"
            raise BucketError(f"S3 bucket {self.bucket!r} {reason}") from None
        except NoCredentialsError:
            raise BucketError(
                f"S3 bucket {where}: no AWS credentials found (environment, profile or role)"
            ) from None
        except BotoCoreError as exc:
            detail = " ".join(str(exc).split())[:200]
            raise BucketError(f"S3 bucket {where} cannot be reached: {detail}") from None

    def describe(self) -> str:
        return f"S3 store at {self.config.describe()}"

    # ---- CAS ----
    def _exists(self, blob: BlobId) -> bool:
        try:
            head = self._call(
                "check a blob", self.client.head_object, Key=blob_key(self.prefix, blob)
            )
        except ClientError as exc:
            if _is_missing(exc):
                return False
            raise self._unavailable("check a blob", exc) from exc
        if head["ContentLength"] != blob.size:
            log.warning(
                "S3 object for %s has %d bytes; treating it as missing", blob, head["ContentLength"]
            )
            return False
        return True

    def find_blob(self, sha256: str) -> BlobId | None:
        if sha256 == EMPTY_BLOB.hash:
            return EMPTY_BLOB
        key = blob_key(self.prefix, BlobId(sha256, 0))  # validates the hash
        try:
            head = self._call("check a blob", self.client.head_object, Key=key)
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise self._unavailable("check a blob", exc) from exc
        return BlobId(sha256, int(head["ContentLength"]))

    def find_missing(self, blobs: Sequence[BlobId]) -> list[BlobId]:
        unknown = list(dict.fromkeys(b for b in blobs if b != EMPTY_BLOB))
        if len(unknown) == 1:
            present = {unknown[0]} if self._exists(unknown[0]) else set()
        else:
            present = {
                b
                for b, ok in zip(unknown, self._pool.map(self._exists, unknown), strict=True)
                if ok
            }
        missing = set(unknown) - present
        return [b for b in blobs if b in missing]

    def map_blobs(self, fn: Callable[[X], Y], items: Sequence[X]) -> list[Y]:
        if len(items) <= 1:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))

    def _get_bytes(self, key: str, what: str, **kwargs: Any) -> tuple[bytes, dict[str, str]] | None:
        """A whole object (or range) and its metadata; None if absent; cut bodies are re-fetched."""
        for attempt in range(_BODY_ATTEMPTS):
            try:
                response = self._call(what, self.client.get_object, Key=key, **kwargs)
            except ClientError as exc:
                if _is_missing(exc):
                    return None
                raise self._unavailable(what, exc) from exc
            try:
                data = response["Body"].read()  # botocore checks it against Content-Length
            except BotoCoreError as exc:
                if attempt == _BODY_ATTEMPTS - 1:
                    raise self._unavailable(what, exc) from exc
                continue
            if len(data) == response["ContentLength"]:
                return data, response.get("Metadata", {})
        raise StoreUnavailable(f"S3 bucket {self.config.describe()}: cannot {what}: short reads")

    def get_blob(self, blob: BlobId) -> bytes | None:
        if blob == EMPTY_BLOB:
            return b""
        key = blob_key(self.prefix, blob)
        for _ in range(2):  # a second look tells a bad read from a bad object
            got = self._get_bytes(key, "read a blob")
            if got is None:
                return None
            if len(got[0]) != blob.size:
                return None  # the same hash under another size: not this digest
            try:
                verify(got[0], blob)
            except DigestError as exc:
                log.warning("S3 object does not match its digest: %s", exc)
                continue
            return got[0]
        log.warning("deleting corrupt S3 object %s", key)
        self._call("delete a corrupt blob", self.client.delete_object, Key=key)
        return None

    def read_blob(
        self, blob: BlobId, offset: int = 0, chunk_size: int = 1 << 20
    ) -> Iterator[bytes] | None:
        if blob == EMPTY_BLOB or offset >= blob.size:
            if blob != EMPTY_BLOB and not self._exists(blob):
                return None
            return iter(())
        if blob.size <= WHOLE_READ_LIMIT:
            data = self.get_blob(blob)
            if data is None:
                return None
            return (data[i : i + chunk_size] for i in range(offset, len(data), chunk_size))
        # From 0 whatever the offset: the bytes before it are fetched and hashed but
        # not served, so what is served is verified at any offset.
        window = self.config.read_window
        first = self._open_range(blob, 0, min(window, blob.size) - 1)
        if first is None:
            return None
        # Only now: the object has the digest's size, so the windows are few (a
        # wrong size of up to 2^63-1 would have made trillions).
        ranges = windows(0, blob.size, window)
        return self._stream(blob, offset, ranges, first, chunk_size)

    def _open_range(self, blob: BlobId, start: int, end: int) -> Any | None:
        """The streaming body of bytes [start, end] of blob's object; None if absent
        (or of another size)."""
        try:
            response = self._call(
                "read a blob",
                self.client.get_object,
                Key=blob_key(self.prefix, blob),
                Range=f"bytes={start}-{end}",
            )
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise self._unavailable("read a blob", exc) from exc
        total = response.get("ContentRange", "").rpartition("/")[2]
        if total != str(blob.size):
            response["Body"].close()
            return None  # the same hash under another size: not this digest
        if response["ContentLength"] != end - start + 1:
            raise StoreUnavailable(
                f"S3 bucket {self.config.describe()}: object for {blob} has the wrong size "
                f"({response.get('ContentRange')})"
            )
        return response["Body"]

    def _stream(
        self, blob: BlobId, offset: int, ranges: list[tuple[int, int]], body: Any, chunk_size: int
    ) -> Iterator[bytes]:
        """Ranged GETs over the whole object, resumed where a cut one stopped, producing
        the bytes from offset on. The hash of the whole object is checked before the last
        chunk is released, so a wrong blob never reads through to its end at any offset."""
        sha = hashlib.sha256()
        hashed: Future[None] | None = None
        pending = b""
        for start, end in ranges:
            pos = start
            failures = 0
            while pos <= end:
                if body is None:
                    body = self._open_range(blob, pos, end)
                    if body is None:
                        raise StoreUnavailable(f"blob {blob} vanished from S3 while being read")
                error: Exception | None = None
                try:
                    for chunk in body.iter_chunks(chunk_size):
                        at, pos = pos, pos + len(chunk)
                        # Hashed on another thread while the next chunk arrives
                        # (hashlib lets go of the GIL); one at a time, in order.
                        if hashed is not None:
                            hashed.result()
                        hashed = self._hash_pool.submit(sha.update, chunk)
                        if pos <= offset:
                            continue  # before the offset: hashed, not served
                        if at < offset:
                            chunk = chunk[offset - at :]
                        if pending:
                            yield pending
                        pending = chunk
                except BotoCoreError as exc:
                    error = exc
                finally:
                    body.close()
                    body = None
                if pos <= end:  # cut short: resume from pos with a new ranged GET
                    failures += 1
                    if failures >= _BODY_ATTEMPTS:
                        raise self._unavailable("read a blob", error or EOFError("short read"))
                if pos > end + 1:
                    raise StoreUnavailable(f"S3 returned too many bytes for {blob}")
        if hashed is not None:
            hashed.result()
        if sha.hexdigest() != blob.hash:
            raise StoreUnavailable(f"blob {blob} read back from S3 does not match its digest")
        if pending:
            yield pending

    def put_blob(self, blob: BlobId, data: bytes) -> None:
        verify(data, blob)
        if blob == EMPTY_BLOB:
            return
        self._call(
            "store a blob", self.client.put_object, Key=blob_key(self.prefix, blob), Body=data
        )

    def open_writer(self, blob: BlobId) -> BlobWriter:
        return S3BlobWriter(self, blob)

    def abort_stale_uploads(self, older_than: float = 24 * 3600.0) -> int:
        """Abort multipart uploads under the prefix begun before older_than seconds ago.

        They are left by servers that died mid-upload; a bucket lifecycle rule
        (AbortIncompleteMultipartUpload) does the same without a running server.
        """
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than)
        aborted = 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}cas/"):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] <= cutoff:
                        self._abort_upload(upload["Key"], upload["UploadId"])
                        aborted += 1
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable("list multipart uploads", exc) from exc
        return aborted

    def _abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self._call(
                "abort an upload", self.client.abort_multipart_upload, Key=key, UploadId=upload_id
            )
        except ClientError as exc:
            if _code(exc) != "NoSuchUpload":
                raise

    # ---- records ----
    def get_record(self, namespace: str, key: str) -> bytes | None:
        name = record_key(self.prefix, namespace, key)
        for _ in range(2):
            got = self._get_bytes(name, "read a record")
            if got is None:
                return None
            value, meta = got
            expected = meta.get("sha256")
            if expected is None or hashlib.sha256(value).hexdigest() == expected:
                return value
            log.warning("S3 record %s does not match its checksum", name)
        return None

    def put_record(self, namespace: str, key: str, value: bytes, *, overwrite: bool = True) -> bool:
        name = record_key(self.prefix, namespace, key)
        digest = hashlib.sha256(value).hexdigest()
        extra: dict[str, Any] = {} if overwrite else {"IfNoneMatch": "*"}
        for _ in range(5):
            try:
                self._call(
                    "store a record",
                    self.client.put_object,
                    Key=name,
                    Body=value,
                    Metadata={"sha256": digest},
                    **extra,
                )
                return True
            except ClientError as exc:
                code = _code(exc)
                if code == "ConditionalRequestConflict":  # a concurrent conditional write
                    time.sleep(0.05)
                    continue
                if code not in ("PreconditionFailed", "412"):
                    raise self._unavailable("store a record", exc) from exc
            # It exists. Our own earlier attempt may have created it before its
            # response was lost; the same content means the create was ours.
            return self._record_digest(name) == digest
        raise StoreUnavailable(
            f"S3 bucket {self.config.describe()}: record {key!r} stays contended"
        )

    def _record_digest(self, name: str) -> str | None:
        try:
            head = self._call("check a record", self.client.head_object, Key=name)
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise self._unavailable("check a record", exc) from exc
        return head.get("Metadata", {}).get("sha256")

    def list_records(
        self, namespace: str, prefix: str = "", limit: int | None = None
    ) -> list[RecordInfo]:
        encoded_prefix = encode_record_key(namespace, prefix) if prefix else ""
        base = f"{self.prefix}records/{namespace}/"
        encode_record_key(namespace, "x")  # validates the namespace
        found: list[RecordInfo] = []
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            pages = paginator.paginate(
                Bucket=self.bucket,
                Prefix=base + encoded_prefix,
                PaginationConfig={} if limit is None else {"MaxItems": limit},
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    found.append(
                        RecordInfo(
                            decode_record_key(obj["Key"][len(base) :]),
                            obj["Size"],
                            obj["LastModified"].timestamp(),
                        )
                    )
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable("list records", exc) from exc
        found.sort(key=lambda r: r.key)
        return found

    def delete_record(self, namespace: str, key: str) -> None:
        self._call(
            "delete a record",
            self.client.delete_object,
            Key=record_key(self.prefix, namespace, key),
        )

    def close(self) -> None:
        self._pool.close()
        self._hash_pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        self.complete_client.close()


class S3BlobWriter(BlobWriter):
    """Buffers one part at a time; small blobs go up in one PutObject at commit.

    Larger ones become a multipart upload, completed (and so made visible) only
    after the streamed SHA-256 matched; any failure aborts it, leaving no parts.
    """

    def __init__(self, store: S3Store, blob: BlobId) -> None:
        super().__init__(blob)
        self._store = store
        self._key = blob_key(store.prefix, blob)
        self._buffer: list[Chunk] = []
        self._buffered = 0
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._closed = False

    def write(self, data: Chunk) -> None:
        if self._closed:
            raise DigestError("write after the blob was committed or aborted")
        self._take(data)
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= PART_SIZE and self.blob.size > PART_SIZE:
            try:
                self._upload_part()
            except BaseException:
                self.abort()
                raise

    def _upload_part(self) -> None:
        store = self._store
        if self._upload_id is None:
            created = store._call(
                "start an upload", store.client.create_multipart_upload, Key=self._key
            )
            self._upload_id = created["UploadId"]
        body = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        number = len(self._parts) + 1
        part = store._call(
            "upload a part",
            store.client.upload_part,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=body,
        )
        self._parts.append({"ETag": part["ETag"], "PartNumber": number})

    def commit(self) -> None:
        if self._closed:
            raise DigestError("commit after the blob was committed or aborted")
        try:
            self._check_complete()
            store = self._store
            if self.blob == EMPTY_BLOB:
                pass
            elif self._upload_id is None:
                store._call(
                    "store a blob",
                    store.client.put_object,
                    Key=self._key,
                    Body=b"".join(self._buffer),
                )
            else:
                if self._buffered:
                    self._upload_part()
                self._complete()
        finally:
            self.abort()

    def _complete(self) -> None:
        store = self._store
        assert self._upload_id is not None
        try:
            store._call(
                "complete an upload",
                store.complete_client.complete_multipart_upload,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
        except ClientError as exc:
            # A retried Complete whose first attempt succeeded finds no upload.
            if _code(exc) != "NoSuchUpload" or not store._exists(self.blob):
                raise store._unavailable("complete an upload", exc) from exc
        self._upload_id = None

    def abort(self) -> None:
        self._closed = True
        self._buffer, self._buffered = [], 0
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            try:
                self._store._abort_upload(self._key, upload_id)
            except StoreUnavailable as exc:
                log.warning("multipart upload %s left behind: %s", upload_id, exc)
