"""Who may do what on the service: the bearer token (loading, checking) and the root image paths must stay in.

Writes need ``Authorization: Bearer <token>``; reads (``GET /edits*``, ``/generate``, ``/route``,
``/metrics``, the OpenAI routes) need it too when they are protected, which `reads_protected` decides:
by default exactly when the server binds beyond loopback. An ``image_path`` field may only name a file
inside the allowed root. The middleware (which checks writes before their body is read) and the routes
(which check again) both refuse through `check_bearer`.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError, EsgMemoryError
from ..images import load_image

__all__ = ["MIN_TOKEN_CHARS", "TOKEN_ENV", "PathForbiddenError", "check_bearer", "is_loopback", "load_token",
           "reads_protected", "resolve_image_path"]

# the name the flat layout's CLI glue logged under: logging configurations keep matching
logger = logging.getLogger("esg_memory.serve")

#: Environment variable the bearer token is read from (unless a token file is given).
TOKEN_ENV = "ESG_MEMORY_TOKEN"
#: Shorter tokens are refused at start: a guessable token is no protection.
MIN_TOKEN_CHARS = 16


class PathForbiddenError(EsgMemoryError):
    """An image path outside the allowed root, or paths disabled (403, not a validation error)."""


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ``::1``, ``localhost``). Anything else, a
    wildcard (``0.0.0.0``, ``::``, ``""``) or another host name included, counts as beyond loopback."""
    if host is None:
        return False
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def reads_protected(host: str | None, protect_reads: bool | None, token: str | None) -> bool:
    """Whether reads need the bearer token: ``protect_reads`` when given (``--protect-reads`` /
    ``--open-reads``), else exactly when ``host`` is beyond loopback (None: a loopback default, for an app
    built in-process; `esg_memory.serve.server.running_server` refuses to bind such an app beyond loopback).
    Protected reads without a token are a `ConfigError`: nobody could read."""
    protect = (host is not None and not is_loopback(host)) if protect_reads is None else bool(protect_reads)
    if protect and token is None:
        why = "--protect-reads was given" if protect_reads else f"the server binds {host!r}, beyond loopback"
        raise ConfigError(
            f"reads are protected ({why}) but no bearer token is set: set ${TOKEN_ENV} or --token-file, "
            "or pass --open-reads to serve reads without a token"
        )
    return protect


def load_token(token_file: str | os.PathLike | None = None) -> str | None:
    """The bearer token: the file's stripped content if given, else ``$ESG_MEMORY_TOKEN``, else None."""
    if token_file is not None:
        p = Path(token_file)
        try:
            token = p.read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read token file {str(p)!r}: {e.strerror}") from None
        if hasattr(os, "getuid") and p.stat().st_mode & 0o077:
            logger.warning("token file %s is readable by other users; chmod 600 it", p)
    else:
        token = os.environ.get(TOKEN_ENV, "").strip() or None
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the bearer token must be at least {MIN_TOKEN_CHARS} characters")
    return token


def check_bearer(header: str | None, token: str | None) -> None:
    """401 without credentials, 403 with wrong ones; constant-time comparison."""
    from starlette.exceptions import HTTPException

    if token is None:
        return
    if not header:
        raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
    scheme, _, cred = header.partition(" ")
    if scheme.lower() != "bearer" or not cred.strip():
        raise HTTPException(401, "expected 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(cred.strip().encode(), token.encode()):
        raise HTTPException(403, "invalid bearer token")


def resolve_image_path(path: str, root: Path | None) -> Any:
    """Load an image from a client-given path, refusing anything outside ``root`` (403)."""
    if root is None:
        raise PathForbiddenError("image_path is disabled on this server (start it with --allowed-root DIR)")
    p = Path(path)
    try:
        full = (p if p.is_absolute() else root / p).resolve()
    except (OSError, RuntimeError) as e:
        raise PathForbiddenError(f"image path {path!r} cannot be resolved ({e})") from None
    if full != root and root not in full.parents:
        raise PathForbiddenError(f"image path {path!r} resolves outside the allowed root")
    return load_image(full, allowed_root=root)
