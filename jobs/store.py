"""The artifact store: every S3 key is built here, outputs are written before their manifest.

Layout: `runs/<run-id>/<unit>/<file>` where a unit is a phase (`split`) or a shard of one
(`teacher/shard-00003`); `runs/<run-id>/<unit>/_SUCCESS.json` is written last and lists each output's
sha256, size and row count, the unit's fingerprint (config hash + input fingerprints + code version), its
metrics, a `write_id` new at every write and the `write_id` of each input it read (so a redone input redoes
what read it). Readers go through `read`, which refuses a unit without a manifest and checks the hash.
Caches shared across runs live under `cache/<kind>/<key>/`, each entry beside a `<name>.sha256` record that
`read_cached` checks. A unit being written holds a lease under `leases/` (`jobs.lease`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs import CODE_VERSION
from jobs.errors import InputError, TransientError
from jobs.inputs import MB, decode_text, read_capped, too_big
from jobs.log import get_logger

MANIFEST = "_SUCCESS.json"
# beside a cache entry: its sha256 and size, written after it (`write_cached`)
CACHE_DIGEST = ".sha256"
# every run's units live under RUNS<run id>/
RUNS = "runs/"
LEASES = "leases/"
# a run id becomes S3 keys, folder names and the pods' label value: Kubernetes' label-value rules
RUN_ID = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
S3_URL = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(.+)$")
# each S3 request is tried this often by botocore (5xx, throttling, connection errors, timeouts), and each
# operation (request plus reading the body) this often by the store, with jittered exponential backoff
REQUEST_ATTEMPTS = 3
OPERATION_ATTEMPTS = 3
RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestLimitExceeded",
               # a retried CompleteMultipartUpload whose first answer was lost: the whole upload is redone
               "NoSuchUpload"}


def check_run_id(run_id: str) -> str:
    if not RUN_ID.match(run_id):
        raise InputError(f"run id {run_id!r} is not valid: 1-63 letters, digits, '-', '_' or '.', starting and "
                         "ending with a letter or digit")
    return run_id


def parse_s3_url(uri: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`, checked before any call is made."""
    match = S3_URL.match(uri)
    if not match:
        raise InputError(f"{uri!r} is not an S3 object URL: expected s3://<bucket>/<key> (bucket: 3-63 "
                         "lower-case letters, digits, '.' or '-')")
    return match.group(1), match.group(2)


def transient_fault(exc: BaseException) -> str | None:
    """What makes `exc` (or the error it wraps) a fault a retry may cure, or None for a lasting one."""
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError, ResponseStreamingError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from s3transfer.exceptions import RetriesExceededError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ClientError):
            status = seen.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = seen.response.get("Error", {}).get("Code", "")
            return f"{status} {code}".strip() if status >= 500 or status == 429 or code in RETRY_CODES else None
        if isinstance(seen, BotoConnectionError | HTTPClientError | IncompleteReadError | ResponseStreamingError
                      | RetriesExceededError | ConnectionError | TimeoutError):
            return type(seen).__name__
        seen = seen.__cause__ or seen.__context__  # upload_file wraps the ClientError it caught
    return None


def _log_retry(response=None, attempts: int = 0, caught_exception=None, operation=None, **_) -> None:
    """botocore's needs-retry hook: log each failed request it is about to retry."""
    status = response[0].status_code if response else 0
    if attempts < REQUEST_ATTEMPTS and (caught_exception is not None or status >= 500 or status == 429):
        fault = type(caught_exception).__name__ if caught_exception is not None else str(status)
        get_logger().warning("s3 retry", by="request", operation=operation.name, attempt=attempts, fault=fault)


@dataclass(frozen=True)
class StoreSettings:
    """Where artifacts live. Credentials are never stored here: boto3 reads them from the environment."""

    bucket: str = "distill"
    endpoint_url: str | None = None
    region: str = "us-east-1"

    @classmethod
    def from_env(cls) -> StoreSettings:
        return cls(bucket=os.environ.get("DISTILL_S3_BUCKET", "distill"),
                   endpoint_url=os.environ.get("DISTILL_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None,
                   region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))

    @property
    def where(self) -> str:
        return f"s3://{self.bucket} at {self.endpoint_url or 'AWS'}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def jsonl_bytes(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def parse_jsonl(data: bytes, where: str, check=None) -> list[dict]:
    """Rows of a JSONL file; `check(row, "<where>:<line>")` may validate and reshape each one."""
    rows = []
    for number, line in enumerate(decode_text(data, where).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}:{number}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise InputError(f"{where}:{number}: not valid JSON (nested too deeply)") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}:{number}: expected a JSON object")
        rows.append(check(row, f"{where}:{number}") if check else row)
    return rows


@dataclass
class UnitWriter:
    """Collects a unit's outputs; the manifest is written only when the `with` block ends cleanly."""

    store: ArtifactStore
    unit: str
    fingerprint: str
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def write_bytes(self, name: str, data: bytes, rows: int | None = None) -> None:
        self.store.put_bytes(self.store.key(self.unit, name), data)
        self.outputs[name] = {"sha256": sha256_bytes(data), "bytes": len(data), "rows": rows}

    def write_jsonl(self, name: str, rows: list[dict]) -> None:
        self.write_bytes(name, jsonl_bytes(rows), rows=len(rows))

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=2, sort_keys=True).encode())

    def upload_file(self, name: str, path: Path) -> None:
        self.store.put_file(self.store.key(self.unit, name), path)
        self.outputs[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "rows": None}


class ArtifactStore:
    def __init__(self, settings: StoreSettings, run_id: str):
        check_run_id(run_id)
        import boto3
        from botocore.config import Config as BotoConfig

        self.settings = settings
        self.run_id = run_id
        # a fresh session: the default one caches credentials from the first environment it saw
        # rclone serves no streaming checksums: send and check them only where S3 requires it
        config = BotoConfig(retries={"total_max_attempts": REQUEST_ATTEMPTS, "mode": "standard"}, connect_timeout=5,
                            read_timeout=60, request_checksum_calculation="when_required",
                            response_checksum_validation="when_required")
        self._s3 = boto3.session.Session().client("s3", endpoint_url=settings.endpoint_url,
                                                  region_name=settings.region, config=config)
        self._s3.meta.events.register("needs-retry.s3", _log_retry)

    # -- keys: the only place they are built
    def key(self, unit: str, name: str = "") -> str:
        return f"{RUNS}{self.run_id}/{unit}/{name}".rstrip("/")

    @staticmethod
    def cache_key(kind: str, key: str, name: str) -> str:
        return f"cache/{kind}/{key}/{name}"

    def lease_key(self, unit: str) -> str:
        """Where the writer of one of this run's units holds its lease (`jobs.lease`): outside `runs/`, so that
        no listing of a unit's outputs sees it."""
        return f"{LEASES}{self.run_id}/{unit}.json"

    def leased_units(self) -> list[str]:
        """The units of this run whose lease is in the store: being written now, or by a writer that died."""
        prefix = f"{LEASES}{self.run_id}/"
        return sorted(key[len(prefix):-len(".json")] for key in self.list_keys(prefix) if key.endswith(".json"))

    def run_ids(self) -> list[str]:
        """Every run in the bucket (this one included), as its id."""
        return [common["Prefix"].removeprefix(RUNS).rstrip("/")
                for page in self._pages(RUNS, Delimiter="/") for common in page.get("CommonPrefixes", [])]

    # -- raw objects
    def _call(self, what: str, fn, **kwargs):
        """`fn(Bucket=..., **kwargs)`, retried whole on transient faults (botocore retries each request too,
        but not a body that breaks off while it is read); lasting errors become one line at once."""
        for attempt in range(1, OPERATION_ATTEMPTS + 1):
            try:
                return fn(Bucket=self.settings.bucket, **kwargs)
            except Exception as exc:
                fault = transient_fault(exc)
                if fault is None:
                    self._lasting(exc, what, kwargs.get("Key", what))
                    raise
                if attempt == OPERATION_ATTEMPTS:
                    raise self._transient(exc, fault, what) from None
                get_logger().warning("s3 retry", by="store", key=what, attempt=attempt, fault=fault)
                time.sleep(0.5 * 2 ** (attempt - 1) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    def _transient(self, exc: Exception, fault: str, what: str) -> TransientError:
        from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

        tries = f"{OPERATION_ATTEMPTS} x {REQUEST_ATTEMPTS} attempts"
        if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
            return TransientError(f"S3 endpoint unreachable: {self.settings.where} ({tries})")
        return TransientError(f"S3 {what}: {fault} from {self.settings.where} ({tries})")

    def _lasting(self, exc: Exception, what: str, key: str) -> None:
        """Raise the one-line error for a fault no retry cures; return for an unexpected one."""
        from botocore.exceptions import ClientError, NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            raise InputError(f"S3 credentials missing for {self.settings.where}: "
                             "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(key) from None
            if code == "NoSuchBucket":
                raise InputError(f"S3 bucket missing: {self.settings.where}") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise InputError(f"S3 access denied ({code}) for {what} in {self.settings.where}") from None
            raise InputError(f"S3 refused {what} ({code or 'no code'}) in {self.settings.where}") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(key, self._s3.put_object, Key=key, Body=data)

    def put_new(self, key: str, data: bytes) -> bool:
        """PutObject with `If-None-Match: *`: False when the key exists, on a server that honours the header
        (AWS S3, MinIO); one that ignores it (rclone serve s3) overwrites and answers True, as a plain PUT."""
        from botocore.exceptions import ClientError

        def put(Bucket, Key):
            try:
                self._s3.put_object(Bucket=Bucket, Key=Key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                # 409: a concurrent conditional write of the key was under way; it may have won
                if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                    return False
                raise

        return self._call(key, put, Key=key)

    def put_file(self, key: str, path: Path) -> None:
        self._call(key, lambda Bucket, Key: self._s3.upload_file(str(path), Bucket, Key), Key=key)

    def get_bytes(self, key: str, limit: int | None = None) -> bytes:
        """The object's bytes; with `limit`, refused by its size before its body is read."""
        def get(Bucket, Key):
            response = self._s3.get_object(Bucket=Bucket, Key=Key)
            if limit is not None and response["ContentLength"] > limit:
                response["Body"].close()
                raise too_big(f"s3://{Bucket}/{Key}", response["ContentLength"], limit)
            return response["Body"].read()

        return self._call(key, get, Key=key)

    def get_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._call(key, lambda Bucket, Key: self._s3.download_file(Bucket, Key, str(path)), Key=key)

    def exists(self, key: str) -> bool:
        try:
            self._call(key, self._s3.head_object, Key=key)
            return True
        except FileNotFoundError:
            return False

    def delete(self, key: str) -> None:
        self._call(key, self._s3.delete_object, Key=key)

    def _pages(self, prefix: str, **options: str) -> Iterator[dict]:
        """The pages of a listing under `prefix`."""
        token = None
        while True:
            extra: dict[str, str] = {"ContinuationToken": token} if token else {}
            page = self._call(prefix, self._s3.list_objects_v2, Prefix=prefix, **options, **extra)
            yield page
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def list_keys(self, prefix: str) -> list[str]:
        return [obj["Key"] for page in self._pages(prefix) for obj in page.get("Contents", [])]

    def sizes(self, prefix: str) -> dict[str, int]:
        """key -> size of every object under `prefix`, from the listing alone (no object is read)."""
        return {obj["Key"]: obj["Size"] for page in self._pages(prefix) for obj in page.get("Contents", [])}

    def digest_object(self, key: str) -> tuple[str, int]:
        """(sha256, size) of an object, streamed: a model of any size is never held in memory."""
        def stream(Bucket, Key):
            h, size = hashlib.sha256(), 0
            body = self._s3.get_object(Bucket=Bucket, Key=Key)["Body"]
            for block in body.iter_chunks(1 << 20):
                h.update(block)
                size += len(block)
            return h.hexdigest(), size

        return self._call(key, stream, Key=key)

    def check_bucket(self) -> None:
        try:
            self._call("bucket", self._s3.head_bucket)
        except FileNotFoundError:  # HEAD answers a bare 404, without the NoSuchBucket code
            raise InputError(f"S3 bucket missing: {self.settings.where}") from None

    # -- units and manifests
    def manifest(self, unit: str) -> dict | None:
        try:
            data = self.get_bytes(self.key(unit, MANIFEST))
        except FileNotFoundError:
            return None
        try:
            return json.loads(data)
        except ValueError:  # a writer killed while sending it: the unit is unfinished
            get_logger().warning("unreadable manifest ignored", key=self.key(unit, MANIFEST))
            return None

    def complete(self, unit: str, fingerprint: str) -> dict | None:
        """The unit's manifest if it was written for exactly this fingerprint, else None."""
        found = self.manifest(unit)
        if found and found.get("fingerprint") == fingerprint:
            return found
        return None

    def require(self, unit: str) -> dict:
        found = self.manifest(unit)
        if found is None:
            raise InputError(f"input {self.key(unit)} has no {MANIFEST}: run its phase first")
        return found

    def _listed(self, unit: str, name: str) -> str:
        """The sha256 the unit's manifest lists for one of its outputs."""
        entry = self.require(unit)["outputs"].get(name)
        if entry is None:
            raise InputError(f"{self.key(unit, name)} is not listed in its {MANIFEST}")
        return entry["sha256"]

    def _mismatch(self, unit: str, name: str) -> InputError:
        return InputError(f"{self.key(unit, name)}: content does not match its {MANIFEST} (sha256)")

    def read(self, unit: str, name: str) -> bytes:
        digest = self._listed(unit, name)
        data = self.get_bytes(self.key(unit, name))
        if sha256_bytes(data) != digest:
            raise self._mismatch(unit, name)
        return data

    def download(self, unit: str, name: str, path: Path) -> Path:
        """One output of a finished unit as a local file, checked against its manifest."""
        digest = self._listed(unit, name)
        self.get_file(self.key(unit, name), path)
        if sha256_file(path) != digest:
            raise self._mismatch(unit, name)
        return path

    def download_unit(self, unit: str, folder: Path) -> Path:
        """Every output of a finished unit, downloaded into `folder` and checked against its manifest."""
        for name in self.require(unit)["outputs"]:
            self.download(unit, name, folder / name)
        return folder

    def read_jsonl(self, unit: str, name: str) -> list[dict]:
        return parse_jsonl(self.read(unit, name), self.key(unit, name))

    def read_json(self, unit: str, name: str) -> Any:
        return json.loads(self.read(unit, name))

    # -- cache entries shared across runs
    def read_cached(self, key: str) -> bytes | None:
        """A cache entry's bytes if it is there and matches the digest recorded when it was written; None (a
        miss) when it is absent, has no record (its writer died between the two, or wrote before records) or
        does not match, which is logged: the caller computes it again and `write_cached` replaces it."""
        try:
            data = self.get_bytes(key)
        except FileNotFoundError:
            return None
        try:
            record = json.loads(self.get_bytes(key + CACHE_DIGEST))
        except (FileNotFoundError, ValueError):
            record = {}
        actual = {"sha256": sha256_bytes(data), "bytes": len(data)}
        if not isinstance(record, dict) or record.get("sha256") != actual["sha256"]:
            record = record if isinstance(record, dict) else {}
            get_logger().warning("cache entry mismatch", key=key, expected_sha256=record.get("sha256"),
                                 actual_sha256=actual["sha256"], expected_bytes=record.get("bytes"),
                                 actual_bytes=actual["bytes"], action="computed again")
            return None
        return data

    def write_cached(self, key: str, data: bytes) -> None:
        """The entry first, then its digest record: an entry without a record is never reused."""
        self.put_bytes(key, data)
        self.put_bytes(key + CACHE_DIGEST, json.dumps({"sha256": sha256_bytes(data), "bytes": len(data)}).encode())

    @contextmanager
    def writing(self, unit: str, fingerprint: str, inputs: dict[str, str] | None = None, *,
                input_writes: dict[str, str | None] | None = None, record: dict[str, Any] | None = None,
                before_manifest=None) -> Iterator[UnitWriter]:
        """Drop any stale manifest, let the caller write outputs, then write the manifest last.

        `input_writes` is the `write_id` of each input unit read; `record` adds fields to the manifest;
        `before_manifest()` may refuse (raise) at the last moment, e.g. when the writer lost its lease."""
        self.delete(self.key(unit, MANIFEST))
        started = time.time()
        writer = UnitWriter(self, unit, fingerprint)
        yield writer
        if before_manifest is not None:
            before_manifest()
        manifest = {"unit": unit, "run_id": self.run_id, "fingerprint": fingerprint, "inputs": inputs or {},
                    "input_writes": input_writes or {}, "write_id": uuid.uuid4().hex,
                    "code_version": CODE_VERSION, "outputs": writer.outputs, "metrics": writer.metrics,
                    "wall_s": round(time.time() - started, 3), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                             time.gmtime()),
                    **(record or {})}
        self.put_bytes(self.key(unit, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())


def fetch_source(settings: StoreSettings, uri: str, max_mb: int) -> bytes:
    """Bytes of a user-named input, a local path or `s3://bucket/key` on the configured endpoint, refused
    before it is read whole when it is over `max_mb`."""
    if uri.startswith("s3://"):
        bucket, key = parse_s3_url(uri)
        # a store on the source's bucket, used for its raw reads and one-line errors only (no run keys)
        other = ArtifactStore(StoreSettings(bucket, settings.endpoint_url, settings.region), run_id="sources")
        try:
            return other.get_bytes(key, limit=max_mb * MB)
        except FileNotFoundError:
            raise InputError(f"{uri}: no such object") from None
    return read_capped(uri, max_mb * MB)
