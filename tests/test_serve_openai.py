"""The OpenAI-compatible API of `esg-memory serve` (``/v1/chat/completions``, ``/v1/models``) through the
official ``openai`` client against a real uvicorn: a tuned edit answers, out-of-scope inputs get the base
model's exact output, streaming, n / stop / max_tokens, usage, OpenAI-shaped errors, auth, a full queue.
Models: the seeded random tiny LLaVA and the tiny offline CLIP (no downloads)."""

from __future__ import annotations

import base64
import io
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import fastapi  # noqa: F401  (an [all] extra: missing means failing, never skipping)
import httpx
import openai
import pytest
import uvicorn  # noqa: F401  (an [all] extra: missing means failing, never skipping)
from _serve_fixtures import GREEN, PURPLE, TOKEN, Q, running
from PIL import Image

from esg_memory.config import ServiceConfig
from esg_memory.serve import GenerateOptions, create_app
from esg_memory.serve.openai_api import served_model_id

OTHER_Q = "how many shapes are there?"
N = 6  # max_tokens of most requests


def uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def user(text: str, image_url: str | None = None) -> dict:
    if image_url is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": image_url}}]}


def pil(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


def wrap(serve_base):
    from esg_memory.config import EditedModelConfig
    from esg_memory.model import EditedModel

    model, processor, encoder = serve_base
    # no generated paraphrases/augmentations: tuning on one example keeps the test in seconds
    cfg = EditedModelConfig(n_paraphrases=0, n_augmented_images=0, tune="never")
    return EditedModel.wrap(model, processor, memory=None, encoder=encoder, config=cfg)


@pytest.fixture(scope="module")
def served(serve_base, tmp_path_factory):
    """One server for the module: token-protected reads, an allowed image root, one tuned edit."""
    tmp = tmp_path_factory.mktemp("oai")
    root = tmp / "images"
    root.mkdir()
    (root / "purple.png").write_bytes(PURPLE)
    (tmp / "outside.png").write_bytes(GREEN)
    em = wrap(serve_base)
    with em.disable_edits():
        bare = em.answer([pil(GREEN)], [OTHER_Q], max_new_tokens=N)[0]
    app = create_app(em, tmp / "mem", token=TOKEN, allowed_root=root, protect_reads=True)
    with running(app) as url:
        service = app.state.service
        added = service.add_edit(PURPLE, Q, "purple", tune="sync")
        client = openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0, timeout=60)
        yield types.SimpleNamespace(url=url, em=em, service=service, eid=added["id"], root=root, tmp=tmp,
                                    bare=bare, client=client, model=served_model_id(em))


def chat(s, messages, **kw):
    if "max_completion_tokens" not in kw:
        kw.setdefault("max_tokens", N)
    return s.client.chat.completions.create(model=s.model, messages=messages, **kw)


def esg(choice) -> dict:
    return (choice.model_extra or {})["esg"]


def prompt_tokens(em, png: bytes | None, text: str) -> int:
    inputs = em.build_inputs(None if png is None else [pil(png)], [text])
    return int(inputs["attention_mask"][0].sum())


# ------------------------------------------------------------------------------------------ answers


def test_edit_answers_and_other_inputs_get_the_base_output(served):
    s = served
    r = chat(s, [user(Q, uri(PURPLE))])
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == s.model
    (c,) = r.choices
    assert c.index == 0 and c.message.role == "assistant"
    assert c.message.content.startswith("purple")
    assert esg(c)["edit_id"] == s.eid and esg(c)["version"] == 1 and esg(c)["margin"] > 0
    # the same pipeline as the native service, token for token
    native = s.service.generate([(pil(PURPLE), Q)], GenerateOptions(max_new_tokens=N))[0]
    assert c.message.content == native["text"] and c.finish_reason == native["finish_reason"]
    assert r.usage.prompt_tokens == prompt_tokens(s.em, PURPLE, Q)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 1 <= r.usage.completion_tokens <= N

    o = chat(s, [user(OTHER_Q, uri(GREEN))])
    assert esg(o.choices[0])["edit_id"] is None and esg(o.choices[0])["version"] is None
    assert o.choices[0].message.content == s.bare  # out of scope: the bare model's exact output
    assert o.usage.prompt_tokens == prompt_tokens(s.em, GREEN, OTHER_Q)
    if o.choices[0].finish_reason == "length":
        assert o.usage.completion_tokens == N


def test_last_user_text_and_last_image_anywhere_route_the_conversation(served):
    s = served
    convo = [
        {"role": "system", "content": "You answer questions about shapes."},
        user("something else entirely", uri(GREEN)),
        {"role": "assistant", "content": "ok"},
        user("and this one?", uri(PURPLE)),  # the last image of the conversation
        {"role": "assistant", "content": None},
        user(Q),  # the last user text, no image of its own
    ]
    c = chat(s, convo).choices[0]
    assert esg(c)["edit_id"] == s.eid and c.message.content.startswith("purple")
    # an image given as a path inside the allowed root, relative or as a file:// URL, is the same image
    for ref in ("purple.png", (s.root / "purple.png").as_uri()):
        c = chat(s, [user(Q, ref)]).choices[0]
        assert esg(c)["edit_id"] == s.eid, ref
    # text only: routed by the text alone (the edit is keyed on its image too)
    t = chat(s, [user(OTHER_Q)])
    assert esg(t.choices[0])["edit_id"] is None
    assert t.usage.prompt_tokens == prompt_tokens(s.em, None, OTHER_Q)


def test_streaming_reassembles_the_same_text(served):
    s = served
    for messages in ([user(Q, uri(PURPLE))], [user(OTHER_Q, uri(GREEN))]):
        whole = chat(s, messages)
        chunks = list(chat(s, messages, stream=True, stream_options={"include_usage": True}))
        assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == whole.choices[0].message.content
        last = [ch for ch in chunks if ch.choices][-1].choices[0]
        assert last.finish_reason == whole.choices[0].finish_reason
        assert (last.model_extra or {})["esg"] == esg(whole.choices[0])
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # on the wire: server-sent events ending with [DONE]
    body = {"model": s.model, "messages": [user(Q, uri(PURPLE))], "max_tokens": N, "stream": True}
    with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert '"usage"' not in "".join(events)  # no usage chunk unless asked for


def test_n_stop_and_length(served):
    s = served
    one = chat(s, [user(Q, uri(PURPLE))])
    two = chat(s, [user(Q, uri(PURPLE))], n=2)  # greedy: n identical choices
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.message.content for c in two.choices] == [one.choices[0].message.content] * 2
    assert all(esg(c)["edit_id"] == s.eid for c in two.choices)
    assert two.usage.completion_tokens == 2 * one.usage.completion_tokens
    assert two.usage.prompt_tokens == one.usage.prompt_tokens

    text = one.choices[0].message.content
    assert len(text) >= 4
    stop = text[2:4]
    cut = chat(s, [user(Q, uri(PURPLE))], stop=[stop, "no such stop string"]).choices[0]
    assert cut.message.content == text[:text.find(stop)] and cut.finish_reason == "stop"
    assert chat(s, [user(Q, uri(PURPLE))], stop="no such stop string").choices[0].message.content == text

    full = chat(s, [user(OTHER_Q, uri(GREEN))])
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == N  # no EOS in N
    short = chat(s, [user(OTHER_Q, uri(GREEN))], max_completion_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert full.choices[0].message.content.startswith(short.choices[0].message.content)

    # sampling: seeded choices are reproducible, and choice i uses seed + i
    sampled = dict(temperature=1.5, top_p=0.9)
    a = chat(s, [user(OTHER_Q, uri(GREEN))], n=2, seed=7, **sampled)
    b = chat(s, [user(OTHER_Q, uri(GREEN))], n=2, seed=7, **sampled)
    c = chat(s, [user(OTHER_Q, uri(GREEN))], n=1, seed=8, **sampled)
    texts = [x.message.content for x in a.choices]
    assert texts == [x.message.content for x in b.choices]
    assert texts[1] == c.choices[0].message.content
    assert texts != [s.bare, s.bare]  # sampled, not greedy


# ------------------------------------------------------------------------------------------ models, docs


def test_models_and_openapi(served):
    s = served
    assert [m.id for m in s.client.models.list().data] == [s.model]
    m = s.client.models.retrieve(s.model)
    assert m.id == s.model and m.owned_by == "esg-memory" and m.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        s.client.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        s.client.chat.completions.create(model="gpt-4o", messages=[user(Q)], max_tokens=2)
    assert e.value.body["param"] == "model" and s.model in e.value.body["message"]
    spec = httpx.get(s.url + "/openapi.json", timeout=30).json()
    post = spec["paths"]["/v1/chat/completions"]["post"]
    assert "ChatCompletionRequest" in str(post["requestBody"]) and "ChatCompletion" in str(post["responses"])
    assert "/v1/models" in spec["paths"] and "/generate" in spec["paths"]


# ------------------------------------------------------------------------------------------ errors, auth


def _shape(err) -> dict:
    body = err.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def test_bad_requests_get_openai_errors(served):
    s = served
    cases = [
        ([{"role": "system", "content": "no user here"}], {}, openai.BadRequestError, "messages"),
        ([user(Q, "data:image/png;base64,!!not base64!!")], {}, openai.BadRequestError, "messages"),
        ([user(Q, "data:image/png;base64," + base64.b64encode(b"not an image").decode())], {},
         openai.BadRequestError, "messages"),
        ([user(Q, "https://example.com/cat.png")], {}, openai.UnprocessableEntityError, "messages"),
        ([user(Q, "../outside.png")], {}, openai.PermissionDeniedError, "messages"),
        ([user(Q, str(s.tmp / "outside.png"))], {}, openai.PermissionDeniedError, "messages"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], {},
         openai.BadRequestError, None),
        ([{"role": "tool", "content": "x"}], {}, openai.BadRequestError, "messages[0].role"),
        ([user(Q)], {"max_tokens": 100_000}, openai.BadRequestError, "max_tokens"),
        ([user(Q)], {"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "stop"),
        ([user(Q)], {"n": 99}, openai.BadRequestError, "n"),
        ([user(Q)], {"frequency_penalty": 1.0}, openai.BadRequestError, "frequency_penalty"),
    ]
    for messages, extra, cls, param in cases:
        with pytest.raises(cls) as e:
            s.client.chat.completions.create(model=s.model, messages=messages, **{"max_tokens": 2, **extra})
        err = _shape(e.value)
        assert err["type"] == ("permission_error" if cls is openai.PermissionDeniedError
                               else "invalid_request_error"), err
        if param is not None:
            assert err["param"] == param, err
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.get(s.url + "/v1/completions", headers=auth, timeout=30)  # not implemented: OpenAI's 404
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(s.url + "/v1/chat/completions", content=b"{not json", headers=auth, timeout=30)
    assert r.status_code == 400 and set(r.json()) == {"error"}
    # native paths keep their own error body
    r = httpx.get(s.url + "/edits/999", headers=auth, timeout=30)
    assert r.status_code == 404 and r.json()["error"] == "UnknownEditError"


def test_reads_need_the_token_when_protected(served):
    s = served
    wrong = openai.OpenAI(base_url=s.url + "/v1", api_key="x" * 24, max_retries=0, timeout=30)
    with pytest.raises(openai.PermissionDeniedError) as e:
        wrong.chat.completions.create(model=s.model, messages=[user(Q)], max_tokens=2)
    assert _shape(e.value)["type"] == "authentication_error"
    with pytest.raises(openai.PermissionDeniedError):
        wrong.models.list()
    r = httpx.get(s.url + "/v1/models", timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error"


def test_full_queue_is_429_and_open_reads_need_no_token(serve_base):
    """A second server: reads open (no token at all), a queue of one, a small body limit."""
    em = wrap(serve_base)
    entered, gate = threading.Event(), threading.Event()
    real = em.generate

    def gated(*args, **kwargs):  # holds the batcher's worker inside the model call until released
        entered.set()
        gate.wait(60)
        return real(*args, **kwargs)

    em.generate = gated
    app = create_app(em, None, read_only=True, config=ServiceConfig(max_queue=1), max_upload_bytes=64 * 1024)
    svc = app.state.service
    try:
        with running(app) as url, ThreadPoolExecutor(2) as pool:
            client = openai.OpenAI(base_url=url + "/v1", api_key="no-token-needed", max_retries=0, timeout=60)
            model = served_model_id(em)

            def ask():
                return client.chat.completions.create(model=model, messages=[user(OTHER_Q, uri(GREEN))],
                                                      max_tokens=2)

            first = pool.submit(ask)
            assert entered.wait(60)  # the worker runs the first request
            second = pool.submit(ask)
            deadline = time.monotonic() + 60
            while svc.queued() < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert svc.queued() == 1  # the second waits in the queue: it is full
            with pytest.raises(openai.RateLimitError) as e:
                ask()
            err = _shape(e.value)
            assert e.value.status_code == 429 and err["code"] == "rate_limit_exceeded"
            assert e.value.response.headers["retry-after"] == "1"
            gate.set()
            for f in (first, second):
                assert esg(f.result(60).choices[0])["edit_id"] is None
            # the body limit, declared (Content-Length) or streamed (chunked), in OpenAI's shape
            r = httpx.post(url + "/v1/chat/completions", content=b"x" * (100 * 1024), timeout=30)
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
            r = httpx.post(url + "/v1/chat/completions", content=iter([b"x" * 40_000, b"y" * 40_000]),
                           headers={"content-type": "application/json"}, timeout=30)
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
            assert httpx.get(url + "/v1/models", timeout=30).status_code == 200  # open reads: no token
    finally:
        gate.set()
