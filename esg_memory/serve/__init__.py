"""``esg-memory serve``: an HTTP service (FastAPI + uvicorn, the ``serve`` extra) over an `EditedModel`.

Writes (``POST/PATCH/DELETE /edits...``) need ``Authorization: Bearer <token>`` and are persisted
before the reply; ``POST /generate`` requests are micro-batched; ``GET /metrics`` is Prometheus
text. FastAPI is imported only when an app is built, so the core library never needs it.

    ESG_MEMORY_TOKEN=$(openssl rand -hex 24) esg-memory serve --memory ./mem --port 8000
    curl -H "Authorization: Bearer $ESG_MEMORY_TOKEN" -F image=@cat.png -F question="what is it?" \\
         -F answer="a lynx" http://127.0.0.1:8000/edits
    curl -F image=@cat.png -F prompt="what is it?" http://127.0.0.1:8000/generate

Modules, from the outside in (each imports only those below it):

=================  ===========================================================================
``cli``            options, opening the model, `main` (``python -m esg_memory.serve``: ``__main__``)
``server``         running an app under uvicorn: `serve` (blocking), `running_server` (a thread)
``app``            `create_app`: checks the options, takes the directory lock, wires the rest
``middleware``     `RequestLimits`: body-size limit, early auth of writes, request metrics
``routes``         the endpoints: request bodies onto `EditService` calls
``bodies``         a multipart form or JSON body (by Content-Type) into the route's request model
``schemas``        pydantic request and reply models (what ``/openapi.json`` documents)
``openai_api``     the OpenAI-compatible ``/v1`` endpoints and error bodies (models: ``openai_schemas``)
``http_errors``    the status of each error, the JSON error body, the exception handlers
``auth``           the bearer token (loading, checking), the read policy, the allowed root of image paths
``service``        `EditService`: writes (journaled before the reply), reads, health, shutdown
``generation``     `BatchedGenerator`: routing and batched generation consistent with writes
``batch``          `MicroBatcher`: equal-option requests share a model call
``directory``      `DirectoryLock` (one writing server per directory), `check_memory_dir`
``metrics``        `Metrics`: ``prometheus_client`` counters, histograms, gauges in a per-app registry
=================  ===========================================================================

This package re-exports the public names, so ``from esg_memory.serve import create_app`` keeps working.
"""

from ..config import ServiceConfig
from .app import create_app
from .auth import MIN_TOKEN_CHARS, TOKEN_ENV, check_bearer, load_token, resolve_image_path
from .batch import MicroBatcher, OverloadedError
from .cli import add_serve_arguments, main, run_from_args
from .directory import DirectoryLock
from .generation import GenerateOptions
from .http_errors import error_status
from .metrics import Metrics
from .middleware import DEFAULT_MAX_UPLOAD_BYTES
from .server import running_server, serve
from .service import EditService, ReadOnlyError

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "MIN_TOKEN_CHARS",
    "TOKEN_ENV",
    "DirectoryLock",
    "EditService",
    "GenerateOptions",
    "Metrics",
    "MicroBatcher",
    "OverloadedError",
    "ReadOnlyError",
    "ServiceConfig",
    "add_serve_arguments",
    "check_bearer",
    "create_app",
    "error_status",
    "load_token",
    "main",
    "resolve_image_path",
    "run_from_args",
    "running_server",
    "serve",
]
