"""`AdapterRuntime`: an adapter made usable by one (model, processor) — compiled, materialised as K/V, tuned.

Compiling is tokenising the edit's statement (`AdapterConfig.statement_template`); materialising runs
the frozen language model once over it (or over the tuned parameters) and keeps the per-layer K/V in
a bounded LRU, keyed by content and by the model's device and dtype. Which adapter an edit version
injects is `esg_memory.model.cache`'s business; the tuning loop is `esg_memory.model.tuning`'s.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import torch

from ..config import AdapterConfig, TunedKind
from ..errors import InvalidInputError
from .adapters import STORAGE_TORCH_DTYPES, Adapter, adapter_bytes, soft_rank_for
from .families import Family, PrefixKV
from .tuning import TuneReport, tune_prefix

__all__ = ["AdapterRuntime"]


class AdapterRuntime:
    """Compiles and materialises adapters for one (model, processor); tunes them (`tuning.tune_prefix`).

    Holds the process's thread-safe LRU of materialised K/V (``config.cache_size`` prefixes).
    """

    def __init__(self, model: Any, processor: Any, family: Family, config: AdapterConfig | None = None):
        self.model = model
        self.processor = processor
        self.family = family
        self.config = config or AdapterConfig()
        self.spec = family.spec(model)
        self.fingerprint = self.spec.fingerprint()
        self._lru: OrderedDict[tuple, PrefixKV] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    # ---- building --------------------------------------------------------------------------------
    def statement_ids(self, question: str, answer: str) -> torch.Tensor:
        text = self.config.statement_template.format(question=question.strip(), answer=answer.strip())
        ids = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidInputError("the edit's statement tokenises to nothing")
        return torch.tensor(ids, dtype=torch.long)

    def compile(self, edit_id: int, version: int, question: str, answer: str) -> Adapter:
        """The instant adapter: token ids of the statement (K/V computed lazily, cached)."""
        return Adapter(
            "compiled", int(edit_id), int(version), self.fingerprint, self.statement_ids(question, answer)
        )

    def compatible(self, adapter: Adapter) -> bool:
        return adapter.model == self.fingerprint

    # ---- materialising ---------------------------------------------------------------------------
    def device_dtype(self) -> tuple[torch.device, torch.dtype]:
        emb = self.model.get_input_embeddings().weight
        return emb.device, emb.dtype

    def materialize(self, adapter: Adapter, params: dict[str, torch.Tensor] | None = None) -> PrefixKV:
        """Per-layer K/V of an adapter, uncached; differentiable w.r.t. ``params`` (tuning) when given."""
        device, dtype = self.device_dtype()
        src = params if params is not None else adapter.tensors
        if adapter.kind == "kv":
            return [
                (src[f"k.{i}"].to(device, dtype), src[f"v.{i}"].to(device, dtype))
                for i in range(self.spec.num_layers)
            ]
        ids = adapter.token_ids.to(device).unsqueeze(0)
        if adapter.kind == "compiled":
            return self.family.statement_kv(self.model, input_ids=ids)
        emb = self.model.get_input_embeddings()(ids)
        delta = src["u"].to(device, dtype) @ src["v"].to(device, dtype).T
        return self.family.statement_kv(self.model, inputs_embeds=emb + delta.unsqueeze(0))

    def kv(self, adapter: Adapter) -> PrefixKV:
        """Cached K/V for an adapter (LRU keyed by edit, version, content, and the model's device/dtype,
        so moving or casting the base model after wrapping never injects stale tensors)."""
        device, dtype = self.device_dtype()
        key = (adapter.edit_id, adapter.version, adapter.digest, str(device), dtype)
        with self._lock:
            hit = self._lru.get(key)
            if hit is not None:
                self._lru.move_to_end(key)
                self.hits += 1
                return hit
        with torch.no_grad():
            kv = [(k.detach(), v.detach()) for k, v in self.materialize(adapter)]
        with self._lock:
            self.misses += 1
            self._lru[key] = kv
            while len(self._lru) > self.config.cache_size:
                self._lru.popitem(last=False)
        return kv

    def forget(self, edit_id: int) -> None:
        with self._lock:
            for key in [k for k in self._lru if k[0] == edit_id]:
                del self._lru[key]

    # ---- tuning ----------------------------------------------------------------------------------
    def soft_rank(self, length: int) -> int:
        """Rank used for a soft adapter of ``length`` tokens (see ``AdapterConfig.soft_rank``)."""
        return soft_rank_for(self.spec, length, self.config)

    def resolve_kind(self, kind: str, length: int) -> Literal["soft", "kv"]:
        """The concrete tuned kind for ``kind`` (``"auto"`` decided by the stored size of a K/V prefix)."""
        if kind != "auto":
            return kind  # type: ignore[return-value]
        value_bytes = STORAGE_TORCH_DTYPES[self.config.storage_dtype].itemsize
        kv = adapter_bytes(self.spec, length, "kv", value_bytes=value_bytes)
        return "kv" if kv <= self.config.soft_budget_bytes else "soft"

    def tune(
        self,
        base: Adapter,
        examples: Sequence[tuple[Any, str]],
        answer: str,
        kind: TunedKind | None = None,
    ) -> tuple[Adapter, TuneReport]:
        """Optimise a prefix (base frozen) so every ``(image, prompt)`` example greedily yields ``answer``.

        See `esg_memory.model.tuning.tune_prefix`; ``kind`` defaults to ``config.tuned_kind``.
        """
        return tune_prefix(self, base, examples, answer, kind)
