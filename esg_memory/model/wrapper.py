"""``EditedModel``: a frozen multimodal LLM whose answers follow an edit memory, inside each edit's scope.

Per call: each row's (image, question) is routed through the memory; a row in some edit's scope
gets that edit's prefix adapter (see `esg_memory.model.adapters`) injected for that row only; when no
row is in scope the call is forwarded *unchanged* to the base model, so out-of-scope outputs are
bit-identical to the bare model. The base model is never mutated (no hooks, no weight or flag changes).

This module is the facade: construction and loading, the edit writes (each compiles and attaches its
adapter before it returns), answers and explanations, saving. The read path of ``generate`` /
``forward`` is `esg_memory.model.inject.Injector.call` (``messages=`` conversations are templated by
`esg_memory.model.chat`); which adapter a version injects is `esg_memory.model.cache.AdapterCache`'s to
decide; checking and tuning an edit, and its `EditStatus`, are `esg_memory.model.jobs`'s; ``to`` /
``cuda`` / ``half`` ... are `esg_memory.model.placement`'s.

>>> em = EditedModel.wrap(model, processor, memory)
>>> eid = em.add_edit(image, "what color is the shape?", "purple", tune="sync")
>>> em.answer(images=[image], prompts=["what color is the shape?"])
['purple']
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import EditedModelConfig, TuneMode, check_tune_mode
from ..errors import ConfigError, InvalidInputError, UnknownEditError
from ..validate import check_text
from .adapters import ADAPTER_KIND, Adapter
from .cache import AdapterCache
from .chat import conversation_inputs, route_rows
from .families import Family, PrefixKV, get_family
from .identity import (
    MEMORY_DIR,
    check_encoder,
    check_model,
    config_from_meta,
    hub_kwargs,
    open_memory,
    read_meta,
    write_meta,
)
from .inject import Injector
from .jobs import EditJobs
from .placement import ModuleCalls
from .runtime import AdapterRuntime
from .status import EditStatus
from .tuning import TuneReport

__all__ = ["ADAPTER_KIND", "EditStatus", "EditedModel", "Retrieval"]

logger = logging.getLogger("esg_memory.model")  # the name it had as a flat module

_OWN = frozenset({"base_model", "family", "memory", "runtime", "processor", "edit_config", "tune_reports"})


@dataclass(frozen=True)
class Retrieval:
    """Why one row did or did not get an edit (`EditedModel.retrieve`)."""

    row: int
    edit_id: int
    """-1 when no edit is in scope."""
    version: int
    score: float
    threshold: float
    margin: float
    answer: str | None
    """The edit's answer when in scope."""
    explanation: str


class EditedModel(ModuleCalls):
    """Wrapper around a frozen HF image-text-to-text model; see the module docstring."""

    def __init__(self, model: Any, processor: Any, memory: Any, config: EditedModelConfig | None = None):
        self.family: Family = get_family(model)
        self.base_model = model
        self.processor = processor
        self.memory = memory
        self.edit_config = config or EditedModelConfig()
        self.runtime = AdapterRuntime(model, processor, self.family, self.edit_config.adapters)
        # bounded like the K/V cache: the adapters this process injects, stored or compiled here
        self._adapters = AdapterCache(self.runtime, self.edit_config.adapters.cache_size)
        self._inject = Injector(model, processor, self.family, self._prefix)
        self._local = threading.local()
        self._jobs = EditJobs(self, self._edited_answer)
        self.tune_reports: dict[int, TuneReport] = self._jobs.reports
        """The latest tuning report per edit (`TuneReport`)."""

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def wrap(
        cls,
        model: Any,
        processor: Any,
        memory: Any = None,
        encoder: Any = None,
        config: EditedModelConfig | None = None,
        *,
        durable: bool = False,
    ) -> EditedModel:
        """Wrap a model the caller already holds. ``memory``: an EditMemory, a saved directory, or None.

        ``durable=True`` with a directory opens it with `EditMemory.open`: every edit is journaled
        and fsynced before the call returns, and the directory is locked until `close`.
        """
        get_family(model)  # unsupported models fail before any memory is opened
        meta, directory = None, None
        if durable and not isinstance(memory, (str, Path)):
            raise ConfigError("durable=True needs memory= a directory (or use EditMemory.open yourself)")
        if isinstance(memory, (str, Path)):
            check_model(Path(memory), model)  # before any lock is taken or key loaded
            directory = Path(memory)
            memory, meta = open_memory(directory, encoder, durable)
        elif memory is None:
            if encoder is None:
                raise ConfigError("pass memory= (an EditMemory or a directory) or encoder= for a new memory")
            from ..memory import EditMemory

            memory = EditMemory(encoder)
        check_encoder(memory, encoder)
        if config is None and meta is not None:
            config = config_from_meta(meta)
        em = cls(model, processor, memory, config)
        if (
            durable
            and meta is None
            and directory is not None
            and memory.durable_path == (directory / MEMORY_DIR).resolve()
        ):
            em.save_meta(directory)  # a new wrapper directory: reloadable as a whole from now on
        em._owns_memory = durable
        em._attach_adapters()
        return em

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | Path,
        memory: Any = None,
        encoder: Any = None,
        config: EditedModelConfig | None = None,
        processor: Any = None,
        durable: bool = False,
        **hf_kwargs: Any,
    ) -> EditedModel:
        """Load the base with transformers' own ``from_pretrained`` (hub ids or local dirs) and wrap it.

        ``EditedModel.from_pretrained(saved_dir)`` alone reloads a directory written by `save`: the base
        model is the one its ``edited_model.json`` names (a shipped model by its registered name, else
        the HF id or directory it was loaded from), the memory is the directory's.
        ``durable``: see `wrap` (a ``memory`` directory opened with `EditMemory.open`)."""
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        from ..pretrained import is_pretrained_name, pretrained_path

        saved = (
            read_meta(Path(model_id_or_path)) if memory is None and Path(model_id_or_path).is_dir() else None
        )
        if saved is not None:  # a saved wrapper directory: its base model, then its memory
            base = saved.get("name_or_path")
            if not isinstance(base, str) or not base:
                raise ConfigError(
                    f"{model_id_or_path} was saved from a model with no id or directory; pass the base "
                    "model first: from_pretrained(base, memory=dir)"
                )
            return cls.from_pretrained(
                base,
                memory=model_id_or_path,
                encoder=encoder,
                config=config,
                processor=processor,
                durable=durable,
                **hf_kwargs,
            )

        if is_pretrained_name(model_id_or_path):  # a model shipped inside the package
            model_id_or_path = pretrained_path(str(model_id_or_path))

        hf_config = AutoConfig.from_pretrained(model_id_or_path, **hub_kwargs(hf_kwargs))
        get_family(hf_config.model_type)
        if isinstance(memory, (str, Path)):
            check_model(Path(memory), hf_config)  # the architecture, before any weights are loaded
        model = AutoModelForImageTextToText.from_pretrained(model_id_or_path, **hf_kwargs)
        model.eval()
        if processor is None:
            processor = AutoProcessor.from_pretrained(model_id_or_path, **hub_kwargs(hf_kwargs))
        return cls.wrap(model, processor, memory=memory, encoder=encoder, config=config, durable=durable)

    def __getattr__(self, name: str) -> Any:
        # peft-style passthrough; guard internals so a half-built object never recurses
        if name.startswith("_") or name in _OWN:
            raise AttributeError(name)
        return getattr(self.base_model, name)

    def _attach_adapters(self) -> None:
        """On loading a memory: an edit whose current version has no stored adapter (or one for another
        model) gets its compiled one attached, so that reads do not have to write. A memory that cannot
        be written (opened read-only) is left as it is: its reads compile what they miss into this
        process's cache."""
        for edit in self.memory.list() if len(self.memory) else ():
            try:
                self._adapters.attach_if_missing(self.memory, edit)
            except ConfigError as exc:
                logger.info("memory not writable (%s): adapters are compiled when first used", exc)
                return
            except UnknownEditError:
                continue  # deleted since the listing
            except InvalidInputError as exc:  # e.g. a statement that tokenises to nothing; fails when read
                logger.warning("edit %d: no adapter compiled at load (%s)", edit.id, exc)

    # ---- inputs and adapters ---------------------------------------------------------------------
    def build_inputs(self, images: Sequence[Any] | None, prompts: Sequence[str]) -> dict[str, Any]:
        """Processor outputs for (image, prompt) rows, left-padded, on the model's device and dtype."""
        return self._inject.build_inputs(images, prompts)

    def adapter(self, edit_id: int, version: int | None = None) -> Adapter:
        """The adapter injected for an edit version: the stored one, or compiled now into this process's
        cache (a read never writes to the memory; the edit writes attach theirs)."""
        return self._adapters.get(self.memory, edit_id, version)

    def _prefix(self, edit_id: int) -> PrefixKV | None:
        # what generate/forward inject for a routed edit: exactly `adapter`'s (current version at fetch
        # time, so a revision since routing is not injected stale), as cached K/V
        try:
            return self.runtime.kv(self.adapter(edit_id))
        except UnknownEditError:
            logger.info("edit %d vanished between routing and injection", edit_id)
            return None

    # ---- inference -------------------------------------------------------------------------------
    def generate(
        self,
        images: Any = None,
        prompts: Any = None,
        *,
        messages: Any = None,
        route_images: Any = None,
        route_texts: Any = None,
        route_keys: Any = None,
        **kwargs: Any,
    ) -> Any:
        """``base.generate`` with each in-scope row's edit injected; the bare call when no row is in scope.

        Either ``images=``/``prompts=`` (inputs are built and routed for you), ``messages=`` (multi-turn
        conversations in the chat format, the model's chat template applied: `esg_memory.model.chat`;
        routed by the last user turn's text and the last image), or processor outputs plus
        ``route_texts=`` (and ``route_images=``) or ``route_keys=`` (keys from a previous route).
        """
        return self._call(True, images, prompts, messages, route_images, route_texts, route_keys, kwargs)

    def forward(
        self,
        images: Any = None,
        prompts: Any = None,
        *,
        messages: Any = None,
        route_images: Any = None,
        route_texts: Any = None,
        route_keys: Any = None,
        **kwargs: Any,
    ) -> Any:
        """``base.forward`` with per-row edits (logits cover the input tokens only, as in the bare call)."""
        return self._call(False, images, prompts, messages, route_images, route_texts, route_keys, kwargs)

    __call__ = forward

    def _call(self, generate: bool, images: Any, prompts: Any, messages: Any, route_images: Any,
              route_texts: Any, route_keys: Any, kwargs: dict[str, Any]) -> Any:
        if messages is not None:
            if prompts is not None or "input_ids" in kwargs or "inputs_embeds" in kwargs:
                raise InvalidInputError("pass messages=, prompts= or processor outputs: one of them")
            inputs, texts, imgs = self._conversation(messages, images)
            kwargs = {**inputs, **kwargs}
            if route_images is None and route_texts is None and route_keys is None:
                route_texts, route_images = route_rows(texts), route_rows(imgs)
            images = None
        return self._inject.call(
            self.memory, generate, images, prompts, route_images, route_texts, route_keys, kwargs,
            getattr(self._local, "disabled", 0) > 0,
        )

    def _conversation(self, messages: Any, images: Any) -> tuple[dict[str, Any], list, list]:
        return conversation_inputs(self.processor, self.family, self.base_model, messages, images)

    def answer(
        self,
        images: Any = None,
        prompts: Any = None,
        max_new_tokens: int = 16,
        *,
        messages: Any = None,
        **gen_kwargs: Any,
    ) -> list[str]:
        """Decoded answers (new tokens only, special tokens dropped) for (image, prompt) rows, or for the
        conversations of ``messages=`` (see `generate`)."""
        if messages is not None:
            if prompts is not None:
                raise InvalidInputError("pass prompts= or messages=, not both")
            inputs, texts, imgs = self._conversation(messages, images)
            routes = {"route_texts": route_rows(texts), "route_images": route_rows(imgs)}
        elif prompts is None:
            raise InvalidInputError("answer() needs prompts= (or messages=)")
        else:
            inputs = self.build_inputs(images, prompts)
            routes = {"route_texts": [prompts] if isinstance(prompts, str) else list(prompts)}
            if images is not None:
                routes["route_images"] = list(images) if isinstance(images, (list, tuple)) else [images]
        gen_kwargs.setdefault("do_sample", False)
        with torch.no_grad():
            out = self.generate(**inputs, **routes, max_new_tokens=max_new_tokens, **gen_kwargs)
        seq = out.sequences if hasattr(out, "sequences") else out
        return self.family.decode_answers(self.processor, seq, inputs["input_ids"].shape[1])

    def _edited_answer(self, image: Any, question: str, max_new_tokens: int) -> str:
        """The edited model's greedy answer to one row, edits on even inside `disable_edits` (the check of
        an edit's own input, `EditJobs.check`)."""
        depth = getattr(self._local, "disabled", 0)
        self._local.disabled = 0
        try:
            images = None if image is None else [image]
            return self.answer(images, [question], max_new_tokens=max_new_tokens)[0]
        finally:
            self._local.disabled = depth

    def retrieve(self, images: Any = None, prompts: Any = None, *, keys: Any = None) -> list[Retrieval]:
        """Per row: which edit fired (id, version, score, threshold, margin, answer) or why none did."""
        if keys is None:
            if prompts is None and images is None:
                raise InvalidInputError("retrieve() needs images=, prompts= or keys=")
            texts = [prompts] if isinstance(prompts, str) else prompts
            if texts is not None and not isinstance(texts, (list, tuple)):
                raise InvalidInputError(f"prompts must be a string or a list, not {type(texts).__name__}")
            imgs = [images] if images is not None and not isinstance(images, (list, tuple)) else images
            res = self.memory.route(images=imgs, texts=texts)  # which checks the rows
        else:
            res = self.memory.route(keys=keys)
        out = []
        for i in range(len(res)):
            eid = int(res.edit_ids[i])
            ans = self._routed_answer(eid, int(res.versions[i])) if eid >= 0 else None
            out.append(
                Retrieval(
                    i,
                    eid,
                    int(res.versions[i]),
                    float(res.scores[i]),
                    float(res.thresholds[i]),
                    float(res.margins[i]),
                    ans,
                    res.explain(i),
                )
            )
        return out

    def _routed_answer(self, edit_id: int, version: int) -> str | None:
        """The answer of the version routing chose; None when the edit was deleted since (a concurrent
        writer may delete or revise between routing and this read: neither may raise or mix versions)."""
        try:
            edit = self.memory.get(edit_id)
            if edit.version == version:
                return edit.answer
            return next(v.answer for v in self.memory.history(edit_id) if v.version == version)
        except (UnknownEditError, StopIteration):
            return None

    @contextlib.contextmanager
    def disable_edits(self) -> Iterator[EditedModel]:
        """Within the block (this thread), every call is the bare base model."""
        self._local.disabled = getattr(self._local, "disabled", 0) + 1
        try:
            yield self
        finally:
            self._local.disabled -= 1

    # ---- edits -----------------------------------------------------------------------------------
    def add_edit(
        self,
        image: Any,
        question: str,
        answer: str,
        positives: Sequence[Any] | None = None,
        tune: TuneMode | None = None,
        metadata: dict[str, Any] | None = None,
        edit_id: int | None = None,
        negatives: Sequence[Any] | None = None,
    ) -> int:
        """Add an edit to the memory with its compiled adapter attached (live at the next call, and stored
        before this returns). ``tune`` (default `EditedModelConfig.tune`, ``"auto"``): ``"auto"`` checks in
        the background that the edit's own input now gets its answer and tunes the adapter when it does
        not; ``"never"`` compiles only; ``"sync"`` / ``"background"`` always tune (before this returns /
        in the background). `edit_status` tells where that stands. ``positives`` / ``negatives``: inputs
        that must / must not route to the edit (see `EditMemory.add`)."""
        tune = self._tune_mode(tune)
        if not isinstance(question, str) or not isinstance(answer, str) or not answer.strip():
            raise InvalidInputError("question and answer must be non-empty strings")
        check_text(question, "question"), check_text(answer, "answer")  # before the tokenizer sees them
        self.runtime.statement_ids(question, answer)  # validate before anything is written
        eid = int(  # positives, negatives and metadata are validated by the memory (None means none)
            self.memory.add(
                image=image,
                question=question,
                answer=answer,
                positives=positives,
                negatives=negatives,
                metadata=metadata,
                edit_id=edit_id,
            )
        )
        try:
            self._adapters.attach(self.memory, eid)
            if tune == "sync":
                self.tune_edit(eid)
        except Exception:
            self.delete_edit(eid)  # a failed call leaves the memory as it was
            raise
        self._start_jobs(eid, tune)
        return eid

    def _start_jobs(self, edit_id: int, tune: str) -> None:
        if tune in ("background", "auto"):
            self.tune_edit(edit_id, background=True, if_needed=tune == "auto")

    def tune_edit(
        self,
        edit_id: int,
        background: bool = False,
        kind: str | None = None,
        *,
        if_needed: bool = False,
        check: bool = True,
    ) -> TuneReport | Future | None:
        """Tune an edit's adapter; swapped in only if the edit's version is unchanged when tuning ends.

        ``if_needed``: first check the edit's own input, and tune only when it does not get the answer
        (None then, or a future of None). ``check``: check it after tuning (one short greedy generate), so
        ``edit_status`` says whether it now gives the answer. ``background``: queue it on this wrapper's
        tuning thread and return the future (`wait_for_tuning` waits for them). A failure is logged,
        recorded (``edit_status(edit_id).tuning == "failed"``) and raised to whoever waits for it."""
        return self._jobs.start(edit_id, background=background, if_needed=if_needed, kind=kind, check=check)

    def check_edit(self, edit_id: int) -> bool:
        """Whether the edited model's greedy answer to the edit's own (image, question) is now its answer;
        recorded in `edit_status`. Runs now, in the calling thread."""
        return bool(self._jobs.check(edit_id))

    def edit_status(self, edit_id: int) -> EditStatus:
        """The current version's `EditStatus`: ``gives_answer`` (True / False / None: not checked yet, or
        the check is pending) and ``tuning`` (``"none"``, ``"pending"``, ``"done"``, ``"failed"``). Kept per
        (edit, version) in this process; after a reload it is read off the stored adapter (tuned:
        ``"done"``, and ``gives_answer=True`` when its tuning reached an exact match; else unknown)."""
        return self._jobs.status(edit_id)

    def wait_for_tuning(self, timeout: float | None = None) -> list[TuneReport]:
        """Block until background jobs finish; the reports of those that tuned. Re-raises the first job
        error (each was logged and recorded as ``tuning="failed"`` already)."""
        return self._jobs.wait(timeout)

    def delete_edit(self, edit_id: int) -> None:
        """Delete an edit (as ``memory.delete``) and drop its cached adapters, K/V and status at once."""
        self.memory.delete(edit_id)
        self.runtime.forget(edit_id)
        self._adapters.forget(edit_id)
        self._jobs.forget(edit_id)

    def revise_edit(self, edit_id: int, tune: TuneMode | None = None, **changes: Any) -> int:
        """Revise an edit (``memory.revise`` arguments); compiles and attaches the new version's adapter,
        then tunes it as ``tune`` says (see `add_edit`). The new version's status starts unknown."""
        tune = self._tune_mode(tune)
        version = int(self.memory.revise(edit_id, **changes))
        self._adapters.attach(self.memory, edit_id, version)
        if tune == "sync":
            self.tune_edit(edit_id)
        self._start_jobs(edit_id, tune)
        return version

    def rollback_edit(self, edit_id: int, version: int) -> int:
        """Roll an edit back to an old version (``memory.rollback``: a new version equal to it); returns
        the new version. The old version's adapter comes back with it (tuned, if it was); it is checked
        now, and compiled and attached if it is missing or unusable."""
        new = int(self.memory.rollback(edit_id, version))
        self._adapters.attach(self.memory, edit_id, new)
        return new

    def _tune_mode(self, tune: Any) -> str:
        tune = self.edit_config.tune if tune is None else tune
        check_tune_mode(tune, error=InvalidInputError)  # an argument, not a configuration
        return tune

    # ---- persistence -----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Save the memory (adapters included) and this wrapper's config; reload with
        ``EditedModel.from_pretrained(directory)`` (the base model the saved meta names) or
        ``EditedModel.wrap(model, processor, memory=directory)``."""
        d = Path(directory)
        if "\x00" in str(d) or (os.path.lexists(d) and not d.is_dir()):
            raise InvalidInputError(f"cannot save into {str(d)!r}: not a directory")
        d.mkdir(parents=True, exist_ok=True)
        self.memory.save(d / MEMORY_DIR)  # its own durable directory: a compaction
        self.save_meta(d)

    def save_pretrained(self, directory: str | Path) -> None:
        """`save` under peft's name: ``EditedModel.from_pretrained(directory)`` alone reloads it."""
        self.save(directory)

    def save_meta(self, directory: str | Path) -> None:
        """Write ``edited_model.json`` (base model identity and this config) into ``directory``, beside a
        memory kept in ``directory/memory`` by other means (a durable memory journaling there)."""
        write_meta(
            Path(directory),
            self.family.model_type,
            self.runtime.fingerprint,
            self.base_model,
            self.edit_config,
        )

    def close(self) -> None:
        """Finish background jobs; a memory this wrapper opened durably is snapshotted and unlocked."""
        self._jobs.close()
        if getattr(self, "_owns_memory", False):  # opened durably by wrap: snapshot, release the lock
            self.memory.close()
