"""Artifact storage: local directories and S3-compatible object stores, atomic writes with sha256.

Importing this package registers both backends (``LocalStore`` for paths and ``file://``,
``S3Store`` for ``s3://``) with :func:`open_store`.
"""
from pruning.artifacts.base import (  # noqa: F401
    SIDECAR_SUFFIX,
    ArtifactStore,
    StoreConfig,
    available_schemes,
    file_sha256,
    open_store,
    register_store,
    sha256_hex,
    validate_key,
)
from pruning.artifacts.errors import (  # noqa: F401
    BucketNotFound,
    ChecksumMismatch,
    KeyNotFound,
    StoreAuthError,
    StoreError,
    StoreServerError,
    StoreUnreachable,
    is_transient_store_error,
)
from pruning.artifacts.lease import LeaseLost, RunBusy, RunLease  # noqa: F401
from pruning.artifacts.local import LocalStore  # noqa: F401  (registers "" and "file")
from pruning.artifacts.s3 import S3Store  # noqa: F401  (registers "s3")
