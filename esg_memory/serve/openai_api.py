"""OpenAI-compatible endpoints of ``esg-memory serve``: ``POST /v1/chat/completions`` (streamed or not),
``GET /v1/models``, ``GET /v1/models/{id}``, with OpenAI's error body on every ``/v1`` path.

Official clients work unchanged: ``openai.OpenAI(base_url=URL + "/v1", api_key=TOKEN)``.

- **What the model sees.** A conversation is routed and answered by its LAST user message's text (its
  text parts joined by newlines) and the LAST image anywhere in the conversation: that is how edits
  are keyed (image, question), and the wrapper answers one question per row. Earlier turns, system
  and assistant messages are validated but not fed to the model.
- **Decoding.** ``temperature`` absent or 0: greedy (deterministic; OpenAI's own default is 1), and
  ``n`` choices are one generation repeated. ``temperature > 0``: sampling with ``top_p``; with a
  ``seed``, choice i uses ``seed + i`` (each runs alone, so it is reproducible), without one the n
  rows are sampled in one batch. ``stop`` cuts the text before the first stop string found
  (``finish_reason`` "stop"); "length" when ``max_tokens`` ended it.
- **Streaming** sends the generated text as word-sized ``chat.completion.chunk`` deltas once the
  generation is done (the batcher generates whole answers), then ``data: [DONE]``; errors that
  happen before (bad input, a full queue) are ordinary error replies.
- Each choice carries ``esg``: the edit injected (``edit_id`` null when none fired), its version,
  the routing score and margin. ``usage`` counts the model's real tokens (image tokens included).
- **Errors** under ``/v1`` have OpenAI's body ``{"error": {"message", "type", "param", "code"}}``;
  a full generate queue is 429 (``rate_limit_exceeded``), invalid input 400, an http(s) image URL 422.
  `install_openai_error_handlers` wraps the app's handlers (`esg_memory.serve.http_errors`) so
  other paths keep the native body.
- **Auth** follows the native ``/generate``: the bearer token is needed when reads are protected.
"""

import asyncio
import base64
import binascii
import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit

from .. import __version__
from ..errors import EsgMemoryError, ImageError, InvalidInputError
from ..images import LoadedImage, image_from_bytes
from .auth import PathForbiddenError, check_bearer, resolve_image_path
from .batch import OverloadedError
from .generation import GenerateOptions
from .http_errors import error_status
from .service import EditService

__all__ = ["UnknownModelError", "UnsupportedImageURLError", "conversation_input",
           "install_openai_error_handlers", "is_openai_path", "load_image_url", "openai_error_body",
           "register_openai_routes", "served_model_id"]

logger = logging.getLogger("esg_memory.serve")

_PREFIX = "/v1"
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_exceeded"}


_UNION_TAGS = ("str", "int", "float", "bool", "none")
_PART_TAGS = ("text", "image_url")


class UnsupportedImageURLError(InvalidInputError):
    """An image URL this server cannot fetch (http/https: it has no internet) or an unknown scheme."""


class UnknownModelError(EsgMemoryError, LookupError):
    """A request names a model this server does not serve (404 ``model_not_found``)."""


def _bad(message: str, param: str | None, cls: type[InvalidInputError] = InvalidInputError) -> Exception:
    """A typed input error that names the request field at fault (OpenAI's ``param``)."""
    exc = cls(message)
    exc.param = param  # type: ignore[attr-defined]
    return exc


def is_openai_path(path: str) -> bool:
    """Whether a request path is under the OpenAI-compatible API (its errors take OpenAI's shape)."""
    return path == _PREFIX or path.startswith(_PREFIX + "/")


def openai_error_body(status: int, message: str, *, type_: str | None = None, param: str | None = None,
                      code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = type_ or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _param(loc: Sequence[Any]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"`` (pydantic's union tags dropped)."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
    out = ""
    for j, part in enumerate(parts):
        if isinstance(part, int):
            out += f"[{part}]"
        elif not isinstance(part, str) or not part.isidentifier() or part in _UNION_TAGS:
            continue  # a union member's name ("str", "list[str]")
        elif j and isinstance(parts[j - 1], int) and part in _PART_TAGS and j + 1 < len(parts):
            continue  # a content part's discriminator value, followed by its field
        else:
            out += f".{part}" if out else part
    return out or None


def _validation(exc: Any) -> tuple[int, dict[str, Any]]:
    found = []
    for e in exc.errors():
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unsupported parameter (this server does not implement it)"
        found.append((_param(e.get("loc", ())) or "", msg))
    # a union reports every member's failure: keep the most specific ones ("content[0].text: Field
    # required", not also "content: Input should be a valid string")
    deeper = [(p, m) for p, m in found
              if not any(q != p and (q.startswith(p + ".") or q.startswith(p + "[")) for q, _ in found)]
    parts = [f"{p}: {m}" if p else m for p, m in deeper[:3]]
    first = deeper[0][0] if deeper and deeper[0][0] else None
    return 400, openai_error_body(400, "; ".join(parts) or "invalid request", param=first,
                                  code="invalid_value")


def openai_error(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, OpenAI error body, extra headers) for any exception raised while serving a /v1 path."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    if isinstance(exc, RequestValidationError):
        return (*_validation(exc), {})
    if isinstance(exc, OverloadedError):
        body = openai_error_body(429, str(exc), code="rate_limit_exceeded")
        return 429, body, {"Retry-After": "1"}
    if isinstance(exc, HTTPException):
        status, headers = exc.status_code, dict(getattr(exc, "headers", None) or {})
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        code = {401: "missing_api_key", 403: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
                413: "request_too_large", 504: "timeout"}.get(status)
        kind = "authentication_error" if status in (401, 403) else None
        return status, openai_error_body(status, detail, type_=kind, code=code), headers
    if isinstance(exc, UnknownModelError):
        return 404, openai_error_body(404, str(exc), param="model", code="model_not_found"), {}
    if isinstance(exc, EsgMemoryError):
        status, param = error_status(exc), getattr(exc, "param", None)
        if isinstance(exc, UnsupportedImageURLError):
            status, code = 422, "unsupported_image_url"
        elif isinstance(exc, InvalidInputError):  # OpenAI answers 400 to invalid input (422 natively)
            status, code = 400, "invalid_image" if isinstance(exc, ImageError) else "invalid_value"
        elif isinstance(exc, PathForbiddenError):
            code = "image_path_forbidden"
        else:
            code = type(exc).__name__
        if status >= 500:
            logger.error("OpenAI API request failed: %s: %s", type(exc).__name__, exc)
        return status, openai_error_body(status, str(exc), param=param, code=code), {}
    logger.error("OpenAI API request failed: %s", type(exc).__name__, exc_info=exc)
    return 500, openai_error_body(500, f"internal error ({type(exc).__name__})", code="internal_error"), {}


def install_openai_error_handlers(app: Any) -> None:
    """Give requests under /v1 OpenAI's error body: each exception handler already on ``app`` (call
    after `esg_memory.serve.http_errors.install_error_handlers`) is wrapped to answer /v1 paths with
    `openai_error`, other paths as before."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def wrap(original: Any) -> Any:
        async def handler(request: Any, exc: Exception) -> Any:
            if not is_openai_path(request.url.path):
                if original is None:
                    raise exc
                return await original(request, exc)
            status, body, headers = openai_error(exc)
            return JSONResponse(body, status_code=status, headers=headers or None)

        return handler

    for cls in (EsgMemoryError, OverloadedError, RequestValidationError, HTTPException, Exception):
        app.exception_handlers.setdefault(cls, None)
    for key, original in list(app.exception_handlers.items()):
        app.exception_handlers[key] = wrap(original)


def served_model_id(model: Any) -> str:
    """The id ``/v1/models`` lists: the base model's registered name or HF id / directory, else its
    architecture (``model_type``, e.g. ``llava``)."""
    from ..model.identity import base_name

    name = base_name(getattr(model, "base_model", model))
    return name or str(getattr(getattr(model, "family", None), "model_type", None) or "esg-memory")


# ---------------------------------------------------------------------------------------- inputs
def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.text for p in content if p.type == "text")


def conversation_input(messages: Sequence[Any]) -> tuple[str, str | None]:
    """(the last user message's text, the URL of the last image anywhere in the conversation or None)."""
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users:
        raise _bad("messages: a user message is needed", "messages")
    for i, m in enumerate(messages):
        if m.content is None and m.role != "assistant":
            raise _bad(f"messages[{i}]: content is required for a {m.role} message", f"messages[{i}].content")
        if m.role in ("system", "developer") and not isinstance(m.content, str) \
                and any(p.type != "text" for p in m.content):
            raise _bad(f"messages[{i}]: a {m.role} message may only hold text", f"messages[{i}].content")
    text = _text_of(messages[users[-1]].content).strip()
    if not text:
        raise _bad("messages: the last user message has no text (the question is needed)",
                   f"messages[{users[-1]}].content")
    url = None
    for m in messages:
        if isinstance(m.content, list):
            for p in m.content:
                if p.type == "image_url":
                    url = p.image_url.url
    return text, url


def load_image_url(url: str, root: Path | None) -> LoadedImage:
    """Decode an ``image_url``: a base64 ``data:image/...`` URI, or a path / ``file://`` URL inside
    ``root`` (403 outside it); http(s) URLs are refused (this server does not fetch)."""
    if not isinstance(url, str) or not url:
        raise ImageError("image_url.url must be a non-empty string")
    if url[:5].lower() == "data:":
        header, sep, payload = url[5:].partition(",")
        media, *params = header.split(";")
        if not sep or "base64" not in [p.strip().lower() for p in params]:
            raise ImageError("image_url: a data URI must look like data:image/png;base64,<data>")
        if media and not media.strip().lower().startswith("image/"):
            raise ImageError(f"image_url: data URI media type {media!r} is not an image")
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("image_url: the data URI is not valid base64") from None
        return image_from_bytes(data, "image_url data URI")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        raise UnsupportedImageURLError("image_url: http(s) URLs are not fetched by this server (it has no "
                                       "internet access); send the image as a data:image/...;base64 URI")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UnsupportedImageURLError(f"image_url: file URL host {parts.netloc!r} is not local")
        return resolve_image_path(unquote(parts.path), root)
    if scheme:
        raise UnsupportedImageURLError(f"image_url: unsupported URL scheme {scheme!r} (use a data URI, "
                                       "a file:// URL or a path inside the allowed root)")
    return resolve_image_path(url, root)


def _stops(stop: str | list[str] | None) -> list[str]:
    from .openai_schemas import MAX_STOP_STRINGS

    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise _bad(f"stop: give at most {MAX_STOP_STRINGS} non-empty strings", "stop")
    return stops


def _cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string found, and whether one was."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def _pieces(text: str) -> list[str]:
    """Word-sized deltas (leading whitespace kept) that concatenate back to ``text``."""
    out = re.findall(r"\s*\S+|\s+$", text)
    return out if "".join(out) == text else [text]


def _options(body: Any, limit: int) -> GenerateOptions:
    mt, mct = body.max_tokens, body.max_completion_tokens
    if mt is not None and mct is not None and mt != mct:
        raise _bad("max_tokens and max_completion_tokens differ: give one", "max_completion_tokens")
    max_new = mct if mct is not None else mt if mt is not None else limit
    if max_new > limit:
        raise _bad(f"max_tokens must be in 1..{limit} on this server",
                   "max_tokens" if mct is None else "max_completion_tokens")
    sample = body.temperature is not None and body.temperature > 0
    if not sample:  # greedy: temperature, top_p and seed change nothing (and equal requests share a batch)
        return GenerateOptions(max_new)
    return GenerateOptions(max_new, True, float(body.temperature),
                           1.0 if body.top_p is None else float(body.top_p), body.seed)


async def _generate(service: EditService, row: tuple[Any, str], opts: GenerateOptions,
                    n: int) -> list[dict[str, Any]]:
    """n results for one (image, prompt) row (see the module docstring for how n is served)."""
    from starlette.exceptions import HTTPException

    if not opts.do_sample:
        jobs = [([row], opts)]
    elif opts.seed is None:
        jobs = [([row] * n, opts)]
    else:
        jobs = [([row], dataclasses.replace(opts, seed=(opts.seed + i) % 2**63)) for i in range(n)]
    futs = []
    try:
        for rows, o in jobs:
            futs.append(service.submit_generate(rows, o))
        waits = [asyncio.wait_for(asyncio.wrap_future(f), service.config.request_timeout_s) for f in futs]
        got = await asyncio.gather(*waits)
    except TimeoutError:
        raise HTTPException(504, "generation timed out") from None
    finally:
        for f in futs:
            f.cancel()  # no-op for finished ones; frees the queue when a later submit was refused
    results = [r for rows in got for r in rows]
    return results * n if not opts.do_sample else results


def register_openai_routes(app: Any, service: EditService, *, token: str | None, root: Path | None,
                           protect_reads: bool, model_id: str | None = None) -> None:
    """Add ``/v1/chat/completions`` and ``/v1/models`` to the FastAPI ``app`` (reads: the token is
    needed with ``protect_reads``, as for ``/generate``), and OpenAI-shaped errors for /v1 paths.
    ``model_id``: the id served (default `served_model_id`)."""
    from fastapi import Depends, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import StreamingResponse
    from fastapi.security import HTTPBearer

    from .openai_schemas import (
        AssistantMessage,
        ChatChoice,
        ChatCompletion,
        ChatCompletionRequest,
        ErrorResponse,
        EsgChoiceInfo,
        ModelCard,
        ModelList,
        Usage,
    )

    mid = model_id or served_model_id(service.model)
    fingerprint = f"esg-memory-{__version__}"
    bearer = HTTPBearer(auto_error=False, description="The API key: needed when reads are protected.")

    def reader(request: Request, _: Annotated[Any, Depends(bearer)] = None) -> None:
        if protect_reads:
            check_bearer(request.headers.get("authorization"), token)

    def card() -> ModelCard:
        return ModelCard(id=mid, created=int(service.started))

    def unknown_model(name: str) -> UnknownModelError:
        return UnknownModelError(f"the model {name!r} does not exist; this server serves {mid!r}")

    errors = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 413, 422, 429, 500, 504)}

    @app.get("/v1/models", tags=["openai"], response_model=ModelList, responses=errors,
             dependencies=[Depends(reader)])
    async def list_models() -> ModelList:
        """The served model (OpenAI's model list)."""
        return ModelList(data=[card()])

    @app.get("/v1/models/{model:path}", tags=["openai"], response_model=ModelCard, responses=errors,
             dependencies=[Depends(reader)])
    async def get_model(model: str) -> ModelCard:
        """One model; 404 unless it is the served one."""
        if model != mid:
            raise unknown_model(model)
        return card()

    sse = {"description": "With stream=true: text/event-stream of `data: <chat.completion.chunk>` events, "
                          "then `data: [DONE]`.", "content": {"text/event-stream": {}}}

    @app.post("/v1/chat/completions", tags=["openai"], response_model=ChatCompletion,
              responses={**errors, 200: sse}, dependencies=[Depends(reader)])
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        """OpenAI's chat completion over the edited model; each choice says which edit fired (``esg``)."""
        if body.model != mid:
            raise unknown_model(body.model)
        text, url = conversation_input(body.messages)
        stops = _stops(body.stop)
        opts = _options(body, service.config.max_new_tokens_limit)
        image = None
        if url is not None:
            try:
                image = (await run_in_threadpool(load_image_url, url, root)).image
            except EsgMemoryError as exc:
                if getattr(exc, "param", None) is None:
                    exc.param = "messages"  # type: ignore[attr-defined]
                raise
        results = await _generate(service, (image, text), opts, body.n)
        choices = []
        for i, r in enumerate(results):
            content, stopped = _cut(r["text"], stops)
            esg = EsgChoiceInfo(edit_id=r["edit_id"], version=r["edit_version"], score=r["score"],
                                margin=r["margin"])
            choices.append(ChatChoice(index=i, message=AssistantMessage(content=content), esg=esg,
                                      finish_reason="stop" if stopped else r["finish_reason"]))
        prompt = int(results[0]["prompt_tokens"])
        completion = sum(int(r["completion_tokens"]) for r in results)
        reply = ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=mid,
                               choices=choices, system_fingerprint=fingerprint,
                               usage=Usage(prompt_tokens=prompt, completion_tokens=completion,
                                           total_tokens=prompt + completion))
        if not body.stream:
            return reply
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_events(reply, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    install_openai_error_handlers(app)


async def _events(reply: Any, include_usage: bool) -> AsyncIterator[bytes]:
    """The server-sent events of a finished `ChatCompletion`: per choice a role chunk, word-sized
    content chunks and a last chunk with finish_reason and ``esg``; the usage chunk; ``[DONE]``."""
    head = {"id": reply.id, "object": "chat.completion.chunk", "created": reply.created, "model": reply.model,
            "system_fingerprint": reply.system_fingerprint}
    if include_usage:
        head["usage"] = None

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n".encode()

    for c in reply.choices:
        base = {"index": c.index, "logprobs": None, "finish_reason": None}
        yield event([{**base, "delta": {"role": "assistant", "content": ""}}])
        for piece in _pieces(c.message.content):
            yield event([{**base, "delta": {"content": piece}}])
        yield event([{**base, "delta": {}, "finish_reason": c.finish_reason, "esg": c.esg.model_dump()}])
    if include_usage:
        yield event([], usage=reply.usage.model_dump())
    yield b"data: [DONE]\n\n"
