"""The pydantic models of the OpenAI-compatible endpoints (`esg_memory.serve.openai_api`): request bodies,
replies and the error body, so ``/openapi.json`` documents them.

Imported only when an app is built (pydantic comes with the ``serve`` extra). No
``from __future__ import annotations``: FastAPI and pydantic read these annotations at runtime.
"""

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "MAX_CHOICES",
    "MAX_STOP_STRINGS",
    "AssistantMessage",
    "ChatChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "ChunkChoice",
    "ChunkDelta",
    "ContentPart",
    "ErrorDetail",
    "ErrorResponse",
    "EsgChoiceInfo",
    "ImagePart",
    "ImageURL",
    "ModelCard",
    "ModelList",
    "StreamOptions",
    "TextPart",
    "Usage",
]

#: Most choices (``n``) one request may ask for.
MAX_CHOICES = 8
#: Most stop strings one request may give (OpenAI's limit).
MAX_STOP_STRINGS = 4


class _Strict(BaseModel):
    # an unknown field is refused (400 naming it), not silently ignored: a client asking for
    # tools, logprobs or penalties must learn that this server does not implement them
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str = Field(..., description="A data:image/...;base64,... URI, or a path (or file:// URL) inside "
                                      "the server's --allowed-root. http(s) URLs are refused (422).")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="Accepted and ignored.")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]  # noqa: UP007


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = Field(
        None, description="Text, or a list of text and image_url parts (null only for assistant turns).")
    name: str | None = Field(None, description="Accepted and ignored.")


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="Send a last chunk with the usage (and no choices).")


class ChatCompletionRequest(_Strict):
    """``POST /v1/chat/completions``. The answer is generated for the LAST user message's text and the
    LAST image anywhere in the conversation (see docs/cli-and-service.md)."""

    model: str = Field(..., description="The served model's id (GET /v1/models); another id is a 404.")
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Most new tokens (default: the server's limit).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens (OpenAI's newer "
                                                                      "name); give one or equal values.")
    temperature: float | None = Field(None, ge=0, le=2, description="Absent or 0: greedy decoding "
                                                                    "(deterministic); > 0: sampling.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling (with temperature > 0).")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to return; identical when greedy.")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP_STRINGS} strings; the text "
                                                           "is cut before the first one found.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Sampling seed (choice i uses seed + i).")
    stream: bool = Field(False, description="Server-sent events of chat.completion.chunk objects.")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted and ignored.")


class EsgChoiceInfo(BaseModel):
    """esg-memory's extension of a choice: which edit (if any) was injected for this answer."""

    edit_id: int | None = Field(..., description="The edit that fired; null when none did.")
    version: int | None = Field(..., description="The edit version injected.")
    score: float | None = Field(..., description="The routing score of the best edit.")
    margin: float | None = Field(..., description="Score minus that edit's threshold.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None
    esg: EsgChoiceInfo


class Usage(BaseModel):
    prompt_tokens: int = Field(..., description="Prompt tokens the model read (image tokens included).")
    completion_tokens: int = Field(..., description="Tokens generated, summed over the choices.")
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None
    esg: EsgChoiceInfo | None = Field(None, description="On the choice's last chunk (with finish_reason).")


class ChatCompletionChunk(BaseModel):
    """One ``data:`` event of a streamed reply (the stream ends with ``data: [DONE]``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "esg-memory"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every refusal under /v1, in OpenAI's shape."""

    error: ErrorDetail
