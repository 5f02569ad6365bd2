"""API keys at the front door, shared by its gRPC and HTTP ports.

Keys come from a file (``--api-keys-file``): one key a line; blank lines and lines starting
with ``#`` are ignored, surrounding whitespace is stripped. A Kubernetes Secret mounted as a
volume is such a file (``kubectl create secret generic kimivl-api-keys --from-file=keys=FILE``).
The file is re-read when it changes (checked at most once a second, on the request path: a
``stat``), so rotation needs no restart: add the new key, roll the clients, remove the old key.
Kubelet updates a mounted Secret by swapping a symlink, which the check sees as a new inode.

Callers send ``authorization: Bearer KEY`` (gRPC metadata or the HTTP header). Keys are kept
and compared as SHA-256 digests with :func:`hmac.compare_digest` against every key (no early
exit), so neither the comparison's time nor a memory dump of the process gives a key away, and
no key is ever logged (only how many there are).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time

from kimivl_contract.errors import Unauthenticated

log = logging.getLogger("kimivl.preprocess")

RECHECK_S = 1.0
MAX_KEYS_FILE_BYTES = 1 << 20
MISSING = "missing API key: send the header authorization: Bearer <key>"
INVALID = "invalid API key"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(text: str) -> list[bytes]:
    """Digests of the keys in a keys file's text (see the module docstring for the format)."""
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(_digest(line))
    return keys


def bearer_token(value: str | None) -> str | None:
    """The token of an ``authorization: Bearer TOKEN`` value (scheme case-insensitive), else None."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class ApiKeys:
    """The keys of one file, re-read when it changes. ``check(authorization)`` raises
    :class:`~kimivl_contract.errors.Unauthenticated` unless it carries one of them."""

    def __init__(self, path: str, *, recheck_s: float = RECHECK_S):
        self.path = path
        self.recheck_s = recheck_s
        self._digests: list[bytes] = []
        self._stamp: tuple | None = None
        self._checked = 0.0
        self._load(initial=True)

    def __len__(self) -> int:
        return len(self._digests)

    def _file_stamp(self) -> tuple:
        st = os.stat(self.path)  # follows symlinks: a Secret's ..data swap is a new inode
        return st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size

    def _load(self, *, initial: bool = False) -> None:
        try:
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            if stamp[3] > MAX_KEYS_FILE_BYTES:
                raise OSError(f"{stamp[3]} bytes; the limit is {MAX_KEYS_FILE_BYTES}")
            with open(self.path, encoding="utf-8") as f:
                digests = parse_keys(f.read())
        except (OSError, UnicodeDecodeError) as e:
            if initial:
                raise SystemExit(f"--api-keys-file {self.path}: cannot read it ({e})") from None
            # Mid-rotation (a file briefly missing) or broken: keep the keys we have.
            log.warning("API keys file %s: cannot re-read it (%s); keeping the %d keys loaded before",
                        self.path, e, len(self._digests))
            return
        if initial and not digests:
            raise SystemExit(f"--api-keys-file {self.path} holds no keys (one key a line; # comments)")
        if not digests:
            log.warning("API keys file %s now holds no keys: every request is refused", self.path)
        elif not initial:
            log.info("API keys file %s changed: %d keys", self.path, len(digests))
        self._digests, self._stamp = digests, stamp

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked >= self.recheck_s:
            self._checked = now
            self._load()

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        self._refresh()
        given = _digest(token)
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(given, d)
        return ok

    def check(self, authorization: str | None) -> None:
        """Raise Unauthenticated unless ``authorization`` is ``Bearer <a key in the file>``."""
        token = bearer_token(authorization)
        if token is None:
            raise Unauthenticated(MISSING)
        if not self.valid(token):
            raise Unauthenticated(INVALID)


def load(path: str | None) -> ApiKeys | None:
    """The keys of ``--api-keys-file`` (None or "" = authentication off), logging which."""
    if not path:
        log.warning("API key authentication is OFF (no --api-keys-file): every client is served")
        return None
    keys = ApiKeys(path)
    log.info("API key authentication is on: %d keys from %s (re-read when it changes)", len(keys), path)
    return keys
