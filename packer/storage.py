"""Opening a location: a local path or a URI (``s3://``, ``gs://``, ``file://``) → a pyarrow
filesystem and the path inside it. Every place navit opens a URI goes through :func:`filesystem`
(pack directories, source listings, image reads on Ray workers), so they all resolve the same way.

Configuration, the standard way:

- credentials and region from the AWS environment / config files, as pyarrow reads them
  (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``,
  ``~/.aws/credentials``, instance roles);
- an S3-compatible endpoint (MinIO, Ceph, a local test server) from ``AWS_ENDPOINT_URL_S3`` or
  ``AWS_ENDPOINT_URL`` (e.g. ``http://127.0.0.1:9000``). pyarrow (≤ 26 at least) ignores these two
  variables, so navit turns them into pyarrow's ``endpoint_override`` and ``scheme`` options itself;
- or pyarrow's URI options on the URI: ``s3://bucket/pack?endpoint_override=host:9000&scheme=http``.
  Options in the URI win over the environment. They apply to that URI only: image objects listed
  from a source URI are read with the environment's settings (their locations are plain
  ``s3://bucket/key``), so give a source's endpoint in the environment.

On a Ray cluster, image objects are read by the workers on every node: set the same environment on
every node before ``ray start``.

No Ray, no torch: imported by the trainer too.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from urllib.parse import parse_qsl, urlencode, urlsplit

import pyarrow.fs as pafs

ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # the AWS SDKs' order of precedence


def is_uri(location: str) -> bool:
    return "://" in location


def env_endpoint() -> str | None:
    """The S3 endpoint URL from the environment (``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``)."""
    for name in ENDPOINT_ENV:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def with_env_options(uri: str) -> str:
    """``uri`` with the environment's S3 endpoint added as pyarrow URI options, unless the URI
    already names one (or is not ``s3://``)."""
    if not uri.startswith("s3://"):
        return uri
    endpoint = env_endpoint()
    base, _, query = uri.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    if endpoint is None or "endpoint_override" in options:
        return uri
    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    options["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
    options.setdefault("scheme", parts.scheme or "https")
    return f"{base}?{urlencode(options)}"


@lru_cache(maxsize=64)
def _from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri)


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI. Local paths become absolute.
    Raises ``ValueError`` (pyarrow's ArrowInvalid) or ``OSError`` for a URI pyarrow cannot open.

    Filesystems are cached per URI (an S3 client is costly to build); the cache key includes the
    environment's endpoint, so changing it takes effect."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    return _from_uri(with_env_options(location))


def object_filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """:func:`filesystem` for one object (an image) named by ``scheme://bucket/key``: the
    filesystem is resolved from ``scheme://bucket`` (so one client serves a whole bucket) and the
    key is used as it is (never URI-decoded: a key may hold ``%``, ``?`` or spaces). Not for
    ``file://`` (callers open local files themselves)."""
    scheme, rest = location.split("://", 1)
    bucket = rest.split("/", 1)[0]
    fs, _ = filesystem(f"{scheme}://{bucket}")
    return fs, rest


def endpoint_of(location: str) -> str:
    """The object store a URI talks to, for messages: its ``endpoint_override`` option, else the
    environment's endpoint, else the provider's default."""
    if location.startswith("s3://"):
        options = dict(parse_qsl(with_env_options(location).partition("?")[2]))
        if "endpoint_override" in options:
            return f"{options.get('scheme', 'https')}://{options['endpoint_override']}"
        return "AWS S3 (default endpoint)"
    return location.split("://", 1)[0] + "://"


# What pyarrow's S3 client reports when it gets no answer (curl: 6 cannot resolve, 7 cannot connect,
# 28 timed out, 35 TLS handshake, 52/56 connection dropped).
_UNREACHABLE = re.compile(r"curlCode: (6|7|28|35|52|56)\b[^;]*")


def describe_store_error(location: str, e: BaseException) -> str:
    """One line for a failed object-store call: ``object store unreachable at ENDPOINT (why)`` when
    the endpoint did not answer, else ``object store at ENDPOINT: first line of the error``."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    hit = _UNREACHABLE.search(text)
    if hit or "NETWORK_CONNECTION" in text:
        why = hit.group(0) if hit else "no network connection"
        return f"object store unreachable at {endpoint_of(location)} ({why})"
    return f"object store at {endpoint_of(location)}: {text[:300]}"
