"""``EditedModel``: a frozen multimodal LLM whose answers follow an edit memory, inside each edit's scope.

Per call: each row's (image, question) is routed through ``memory.route``; a row in some edit's scope
gets that edit's prefix adapter (see :mod:`esg_memory.adapters`) injected for that row only; when no
row is in scope the call is forwarded *unchanged* to the base model, so out-of-scope outputs are
bit-identical to the bare model. The base model is never mutated (no hooks, no weight or flag changes).

>>> em = EditedModel.wrap(model, processor, memory)
>>> eid = em.add_edit(image, "what color is the shape?", "purple", tune="sync")
>>> em.answer(images=[image], prompts=["what color is the shape?"])
['purple']
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from index import atomic_write_bytes

from ._model_config import Retrieval, TuneMode, config_from_meta
from ._model_identity import MEMORY_DIR as _MEMORY_DIR
from ._model_identity import META_FILE as _META_FILE
from ._model_identity import MODEL_FORMAT_VERSION, weights_probe
from ._model_identity import check_encoder as _check_encoder
from ._model_identity import check_model as _check_model
from ._model_identity import hub_kwargs as _hub_kwargs
from ._model_identity import open_memory as _open_memory
from .adapters import Adapter, AdapterRuntime, TuneReport, tuning_examples
from .config import EditedModelConfig
from .errors import (
    ConfigError,
    FormatError,
    InvalidInputError,
    UnknownEditError,
)
from .families import Family, PrefixKV, get_family
from .validate import check_text, normalize_image_arg

__all__ = ["EditedModel", "EditedModelConfig", "Retrieval"]

logger = logging.getLogger(__name__)

ADAPTER_KIND = "adapter"
_OWN = frozenset({"base_model", "family", "memory", "runtime", "processor", "edit_config", "tune_reports"})


class EditedModel:
    """Wrapper around a frozen HF image-text-to-text model; see the module docstring."""

    def __init__(self, model: Any, processor: Any, memory: Any, config: EditedModelConfig | None = None):
        self.family: Family = get_family(model)
        self.base_model = model
        self.processor = processor
        self.memory = memory
        self.edit_config = config or EditedModelConfig()
        self.runtime = AdapterRuntime(model, processor, self.family, self.edit_config.adapters)
        # decoded adapters by (edit, version), bounded like the K/V cache; validated against the stored
        # bytes on every use so a swap through the memory is seen at once
        self._decoded: OrderedDict[tuple[int, int], tuple[bytes, Adapter]] = OrderedDict()
        self._lock = threading.RLock()
        self._local = threading.local()
        self._executor: ThreadPoolExecutor | None = None
        self._futures: dict[int, Future] = {}
        self.tune_reports: dict[int, TuneReport] = {}

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def wrap(cls, model: Any, processor: Any, memory: Any = None, encoder: Any = None,
             config: EditedModelConfig | None = None, *, durable: bool = False) -> EditedModel:
        """Wrap a model the caller already holds. ``memory``: an EditMemory, a saved directory, or None.

        ``durable=True`` with a directory opens it with `EditMemory.open`: every edit is journaled
        and fsynced before the call returns, and the directory is locked until `close`.
        """
        get_family(model)  # unsupported models fail before any memory is opened
        meta, directory = None, None
        if durable and not isinstance(memory, (str, Path)):
            raise ConfigError("durable=True needs memory= a directory (or use EditMemory.open yourself)")
        if isinstance(memory, (str, Path)):
            _check_model(Path(memory), model)  # before any lock is taken or key loaded
            directory = Path(memory)
            memory, meta = _open_memory(directory, encoder, durable)
        elif memory is None:
            if encoder is None:
                raise ConfigError("pass memory= (an EditMemory or a directory) or encoder= for a new memory")
            from .memory import EditMemory

            memory = EditMemory(encoder)
        _check_encoder(memory, encoder)
        if config is None and meta is not None:
            config = config_from_meta(meta)
        em = cls(model, processor, memory, config)
        if durable and meta is None and directory is not None and \
                memory.durable_path == (directory / _MEMORY_DIR).resolve():
            em._save_meta(directory)  # a new wrapper directory: reloadable as a whole from now on
        em._owns_memory = durable
        return em

    @classmethod
    def from_pretrained(cls, model_id_or_path: str | Path, memory: Any = None, encoder: Any = None,
                        config: EditedModelConfig | None = None, processor: Any = None,
                        durable: bool = False, **hf_kwargs: Any) -> EditedModel:
        """Load the base with transformers' own ``from_pretrained`` (hub ids or local dirs) and wrap it.

        ``durable``: see `wrap` (a ``memory`` directory opened with `EditMemory.open`)."""
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        from .pretrained import is_pretrained_name, pretrained_path

        if is_pretrained_name(model_id_or_path):  # a model shipped inside the package
            model_id_or_path = pretrained_path(str(model_id_or_path))

        hf_config = AutoConfig.from_pretrained(model_id_or_path, **_hub_kwargs(hf_kwargs))
        get_family(hf_config.model_type)
        if isinstance(memory, (str, Path)):
            _check_model(Path(memory), hf_config)  # the architecture, before any weights are loaded
        model = AutoModelForImageTextToText.from_pretrained(model_id_or_path, **hf_kwargs)
        model.eval()
        if processor is None:
            processor = AutoProcessor.from_pretrained(model_id_or_path, **_hub_kwargs(hf_kwargs))
        return cls.wrap(model, processor, memory=memory, encoder=encoder, config=config, durable=durable)

    def __getattr__(self, name: str) -> Any:
        # peft-style passthrough; guard internals so a half-built object never recurses
        if name.startswith("_") or name in _OWN:
            raise AttributeError(name)
        return getattr(self.base_model, name)

    # ---- inputs and routing ----------------------------------------------------------------------
    def build_inputs(self, images: Sequence[Any] | None, prompts: Sequence[str]) -> dict[str, Any]:
        """Processor outputs for (image, prompt) rows, left-padded, on the model's device and dtype."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise InvalidInputError(f"prompts must be a string or a list, not {type(prompts).__name__}")
        for j, p in enumerate(prompts):
            if isinstance(p, str) and not p.isascii():
                check_text(p, f"prompts[{j}]")  # lone surrogates would reach the tokenizer as a TypeError
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        pil = None if images is None else [None if im is None else _pil(im) for im in images]
        enc = self.family.build_inputs(self.processor, pil, prompts)
        dev, dt = self.base_model.device, self.base_model.dtype
        return {
            k: (v.to(dev, dt) if v.is_floating_point() else v.to(dev)) if isinstance(v, torch.Tensor) else v
            for k, v in enc.items()
        }

    def _route(self, n: int, images: Any, texts: Any, keys: Any, ids_only: bool = False) -> Any:
        # ids_only: generate/forward need no explanation, and `route_ids` skips the candidate
        # search for rows no scope can hold (an unedited input then costs one key scan)
        route = self.memory.route_ids if ids_only else self.memory.route
        if keys is not None:
            res = route(keys=keys)
        else:
            imgs = list(images) if images is not None else [None] * n
            txts = list(texts) if texts is not None else [None] * n
            if len(imgs) != n or len(txts) != n:
                raise InvalidInputError(f"route_images/route_texts must have one entry per row ({n})")
            res = route(images=imgs, texts=txts)
        if len(res) != n:
            raise InvalidInputError(f"routing gave {len(res)} rows for a batch of {n}")
        return res

    def _plan(self, n: int, images: Any, texts: Any, keys: Any) -> list[PrefixKV | None] | None:
        """Per-row prefixes, or None for the untouched base call (edits disabled or no row in scope)."""
        if getattr(self._local, "disabled", 0) or len(self.memory) == 0:
            return None
        if images is None and texts is None and keys is None:
            raise InvalidInputError(
                "cannot route this call: use generate(images=..., prompts=...) or pass route_texts="
                " (and route_images=) or route_keys= with processor outputs;"
                " disable_edits() runs the bare model"
            )
        routed = self._route(n, images, texts, keys, ids_only=True)
        if not (routed >= 0).any():
            return None  # the common case: the caller's own arguments go to the base model untouched
        ids = routed.tolist()
        # the current version at fetch time: an edit revised or deleted since routing is not injected stale
        plan: list[PrefixKV | None] = []
        for e in ids:
            kv = None
            if e >= 0:
                try:
                    kv = self.runtime.kv(self.adapter(e))
                except UnknownEditError:
                    logger.info("edit %d vanished between routing and injection", e)
            plan.append(kv)
        return plan if any(p is not None for p in plan) else None

    def adapter(self, edit_id: int, version: int | None = None) -> Adapter:
        """The adapter injected for an edit version: the stored one, or compiled now (and attached)."""
        edit = self.memory.get(edit_id)
        version = edit.version if version is None else int(version)
        data = self.memory.attachment(edit_id, ADAPTER_KIND, version=version)
        with self._lock:
            hit = self._decoded.get((edit_id, version))
            if hit is not None and data is not None and (hit[0] is data or hit[0] == data):
                self._decoded.move_to_end((edit_id, version))
                return hit[1]
        adapter = None
        if data is not None:
            try:
                adapter = Adapter.from_bytes(data)
            except FormatError as exc:
                logger.warning("edit %d v%d: unreadable adapter (%s); recompiling", edit_id, version, exc)
            if adapter is not None and not self._valid(adapter, edit, version):
                logger.warning("edit %d v%d: stored adapter is for another model or content; recompiling",
                               edit_id, version)
                adapter = None
        if adapter is None:
            if version != edit.version:
                raise UnknownEditError(f"edit {edit_id} v{version} is not current and has no usable adapter")
            adapter = self.runtime.compile(edit_id, version, edit.question, edit.answer)
            data = adapter.to_bytes()
            self.memory.attach(edit_id, ADAPTER_KIND, data, version=version)
        with self._lock:
            self._decoded[(edit_id, version)] = (data, adapter)
            while len(self._decoded) > self.edit_config.adapters.cache_size:
                self._decoded.popitem(last=False)
        return adapter

    def _valid(self, adapter: Adapter, edit: Any, version: int) -> bool:
        if not self.runtime.compatible(adapter) or adapter.edit_id != edit.id:
            return False
        if version != edit.version:
            return adapter.version == version
        # content check rather than version equality: a rollback copies the old version's adapter
        return torch.equal(adapter.token_ids, self.runtime.statement_ids(edit.question, edit.answer))

    def _with_prefixes(
        self, kwargs: dict[str, Any], plan: list[PrefixKV | None], repeat: int = 1
    ) -> dict[str, Any]:
        if "input_ids" not in kwargs or kwargs.get("inputs_embeds") is not None:
            raise InvalidInputError("edited calls need input_ids (inputs_embeds are not supported)")
        if "cache" in kwargs or "past_key_values" in kwargs:
            raise InvalidInputError("a caller-supplied cache cannot be combined with an edit prefix")
        out = self.family.prefix_kwargs(self.base_model, kwargs, plan, cache_repeat=repeat)
        out.pop("past_key_values", None)
        return out

    def _prepare(self, images: Any, prompts: Any, route_images: Any, route_texts: Any, route_keys: Any,
                 kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[PrefixKV | None] | None]:
        if prompts is not None:
            if "input_ids" in kwargs or "inputs_embeds" in kwargs:
                raise InvalidInputError("pass either prompts= (and images=) or processor outputs, not both")
            kwargs = {**self.build_inputs(images, prompts), **kwargs}
            if route_images is None and route_texts is None and route_keys is None:
                route_texts = [prompts] if isinstance(prompts, str) else list(prompts)
                if images is not None:
                    route_images = list(images) if isinstance(images, (list, tuple)) else [images]
        elif images is not None:
            raise InvalidInputError("images= needs prompts=")
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            if getattr(self._local, "disabled", 0) or len(self.memory) == 0:
                return kwargs, None  # nothing to inject: the base model handles (or rejects) the call
            raise InvalidInputError("edited calls need input_ids of shape (batch, length)")
        return kwargs, self._plan(int(ids.shape[0]), route_images, route_texts, route_keys)

    # ---- inference -------------------------------------------------------------------------------
    def generate(self, images: Any = None, prompts: Any = None, *, route_images: Any = None,
                 route_texts: Any = None, route_keys: Any = None, **kwargs: Any) -> Any:
        """``base.generate`` with each in-scope row's edit injected; the bare call when no row is in scope.

        Either ``images=``/``prompts=`` (inputs are built and routed for you) or processor outputs
        plus ``route_texts=`` (and ``route_images=``) or ``route_keys=`` (keys from a previous route).
        """
        kwargs, plan = self._prepare(images, prompts, route_images, route_texts, route_keys, kwargs)
        if plan is None:
            return self.base_model.generate(**kwargs)
        gc = kwargs.get("generation_config") or self.base_model.generation_config
        beams = int(kwargs.get("num_beams") or gc.num_beams or 1)
        nrs = int(kwargs.get("num_return_sequences") or gc.num_return_sequences or 1)
        return self.base_model.generate(**self._with_prefixes(kwargs, plan, max(beams, nrs)))

    def forward(self, images: Any = None, prompts: Any = None, *, route_images: Any = None,
                route_texts: Any = None, route_keys: Any = None, **kwargs: Any) -> Any:
        """``base.forward`` with per-row edits (logits cover the input tokens only, as in the bare call)."""
        kwargs, plan = self._prepare(images, prompts, route_images, route_texts, route_keys, kwargs)
        if plan is None:
            return self.base_model(**kwargs)
        return self.base_model(**self._with_prefixes(kwargs, plan))

    __call__ = forward

    def answer(
        self, images: Any = None, prompts: Any = None, max_new_tokens: int = 16, **gen_kwargs: Any
    ) -> list[str]:
        """Decoded answers (new tokens only, special tokens dropped) for (image, prompt) rows."""
        if prompts is None:
            raise InvalidInputError("answer() needs prompts=")
        inputs = self.build_inputs(images, prompts)
        routes = {"route_texts": [prompts] if isinstance(prompts, str) else list(prompts)}
        if images is not None:
            routes["route_images"] = list(images) if isinstance(images, (list, tuple)) else [images]
        gen_kwargs.setdefault("do_sample", False)
        with torch.no_grad():
            out = self.generate(**inputs, **routes, max_new_tokens=max_new_tokens, **gen_kwargs)
        seq = out.sequences if hasattr(out, "sequences") else out
        return self.family.decode_answers(self.processor, seq, inputs["input_ids"].shape[1])

    def retrieve(self, images: Any = None, prompts: Any = None, *, keys: Any = None) -> list[Retrieval]:
        """Per row: which edit fired (id, version, score, threshold, margin, answer) or why none did."""
        if keys is None:
            if prompts is None and images is None:
                raise InvalidInputError("retrieve() needs images=, prompts= or keys=")
            texts = [prompts] if isinstance(prompts, str) else prompts
            if texts is not None and not isinstance(texts, (list, tuple)):
                raise InvalidInputError(f"prompts must be a string or a list, not {type(texts).__name__}")
            imgs = [images] if images is not None and not isinstance(images, (list, tuple)) else images
            n = len(texts) if texts is not None else len(imgs)
            res = self._route(n, imgs, texts, None)
        else:
            res = self.memory.route(keys=keys)
        out = []
        for i in range(len(res)):
            eid = int(res.edit_ids[i])
            ans = self._routed_answer(eid, int(res.versions[i])) if eid >= 0 else None
            out.append(
                Retrieval(i, eid, int(res.versions[i]), float(res.scores[i]), float(res.thresholds[i]),
                          float(res.margins[i]), ans, res.explain(i)))
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
    def add_edit(self, image: Any, question: str, answer: str, positives: Sequence[Any] | None = None,
                 tune: TuneMode | None = None, metadata: dict[str, Any] | None = None,
                 edit_id: int | None = None) -> int:
        """Add an edit to the memory with a compiled adapter (live at the next call); optionally tune it."""
        tune = self.edit_config.tune if tune is None else tune
        if tune not in ("never", "sync", "background"):
            raise InvalidInputError(f"tune must be 'never', 'sync' or 'background', not {tune!r}")
        if not isinstance(question, str) or not isinstance(answer, str) or not answer.strip():
            raise InvalidInputError("question and answer must be non-empty strings")
        check_text(question, "question"), check_text(answer, "answer")  # before the tokenizer sees them
        self.runtime.statement_ids(question, answer)  # validate before anything is written
        eid = int(  # positives and metadata are validated by the memory (None means none)
            self.memory.add(image=image, question=question, answer=answer, positives=positives,
                            metadata=metadata, edit_id=edit_id))
        try:
            self.adapter(eid)
        except Exception:
            self.memory.delete(eid)
            raise
        if tune == "sync":
            try:
                self.tune_edit(eid)
            except Exception:
                self.memory.delete(eid)  # a failed call leaves the memory as it was
                raise
        elif tune == "background":
            self.tune_edit(eid, background=True)
        return eid

    def tune_edit(
        self, edit_id: int, background: bool = False, kind: str | None = None
    ) -> TuneReport | Future:
        """Tune an edit's adapter; swapped in only if the edit's version is unchanged when tuning ends."""
        edit = self.memory.get(edit_id)
        if background:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="esg-tune")
                fut = self._executor.submit(self._tune, edit_id, edit.version, kind)
                self._futures[edit_id] = fut
            return fut
        return self._tune(edit_id, edit.version, kind)

    def _tune(self, edit_id: int, version: int, kind: str | None) -> TuneReport:
        edit = self.memory.get(edit_id)
        if edit.version != version:
            raise UnknownEditError(
                f"edit {edit_id} moved to v{edit.version} before tuning v{version} started"
            )
        base = self.adapter(edit_id, version)
        tuned, report = self.runtime.tune(base, self._examples(edit), edit.answer, kind=kind)
        with self._lock:
            current = self.memory.get(edit_id) if edit_id in self.memory else None
            if current is None or current.version != version:
                logger.info("edit %d changed during tuning; tuned v%d discarded", edit_id, version)
            else:
                if not report.exact:  # still kept: it is the best-margin point, never worse than compiled
                    logger.warning("edit %d v%d: tuning stopped short of an exact match (margin %.3f)",
                                   edit_id, version, report.min_margin)
                self.memory.attach(edit_id, ADAPTER_KIND, tuned.to_bytes(), version=version)
            self.tune_reports[edit_id] = report
        return report

    def _examples(self, edit: Any) -> list[tuple[Any, str]]:
        cfg = self.edit_config
        return tuning_examples(
            self.memory, edit, cfg.n_paraphrases, cfg.n_augmented_images, cfg.adapters.max_examples
        )

    def wait_for_tuning(self, timeout: float | None = None) -> list[TuneReport]:
        """Block until background tuning jobs finish; re-raises the first job error."""
        with self._lock:
            futs = list(self._futures.items())
        out = [f.result(timeout=timeout) for _, f in futs]
        with self._lock:
            for eid, f in futs:
                if self._futures.get(eid) is f:
                    del self._futures[eid]
        return out

    def delete_edit(self, edit_id: int) -> None:
        """Delete an edit (as ``memory.delete``) and drop its cached K/V at once."""
        self.memory.delete(edit_id)
        self.runtime.forget(edit_id)
        with self._lock:
            for key in [k for k in self._decoded if k[0] == edit_id]:
                del self._decoded[key]

    def revise_edit(self, edit_id: int, tune: TuneMode | None = None, **changes: Any) -> int:
        """Revise an edit (``memory.revise`` arguments); compiles the new version, optionally tunes it."""
        tune = self.edit_config.tune if tune is None else tune
        if tune not in ("never", "sync", "background"):
            raise InvalidInputError(f"tune must be 'never', 'sync' or 'background', not {tune!r}")
        version = int(self.memory.revise(edit_id, **changes))
        self.adapter(edit_id, version)
        if tune != "never":
            self.tune_edit(edit_id, background=tune == "background")
        return version

    # ---- persistence -----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Save the memory (adapters included) and this wrapper's config; reload with ``from_pretrained``."""
        d = Path(directory)
        if "\x00" in str(d) or (os.path.lexists(d) and not d.is_dir()):
            raise InvalidInputError(f"cannot save into {str(d)!r}: not a directory")
        d.mkdir(parents=True, exist_ok=True)
        self.memory.save(d / _MEMORY_DIR)  # its own durable directory: a compaction
        self._save_meta(d)

    def _save_meta(self, d: Path) -> None:
        meta = {
            "format": "esg-memory-edited-model",
            "format_version": MODEL_FORMAT_VERSION,
            "model_type": self.family.model_type,
            "model": self.runtime.fingerprint,
            "weights_probe": weights_probe(self.base_model),
            "name_or_path": str(getattr(self.base_model, "name_or_path", "")),
            "config": asdict(self.edit_config),
        }
        atomic_write_bytes(d / _META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode())

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if getattr(self, "_owns_memory", False):  # opened durably by wrap: snapshot, release the lock
            self.memory.close()


def _pil(image: Any) -> Any:
    from PIL import Image

    from .images import load_image

    if isinstance(image, Image.Image):
        return normalize_image_arg(image).convert("RGB")  # size limits, as load_image applies them
    return load_image(image).image
