"""Prefix adapters: what an in-scope edit injects into the frozen model, and how it is stored.

Three kinds, all resolving to a per-layer K/V prefix at inference (see :mod:`esg_memory.families`):

* ``compiled`` (instant, no gradient): the frozen model's own K/V of a short statement of the
  correction (``AdapterConfig.statement_template``), computed in one forward pass. Stored as the
  statement's token ids only (4 bytes per token); its K/V are recomputed on demand and kept in an LRU.
* ``soft`` (tuned, the default tuned kind): the statement's input embeddings plus a learned low-rank
  delta ``U @ V.T`` (``P x rank`` and ``hidden x rank``). Starts exactly at the compiled prefix (U = 0)
  and is optimised with the base frozen. Small at any scale: ``(P*r + hidden*r) * 2`` bytes in fp16;
  by default the rank is the largest that fits 64 KiB (rank 7 for LLaVA-1.5-7B and 9 for Qwen2-VL-7B
  at P = 19; full rank on the tiny models). The price: only the prefix's input embeddings move, within
  a rank-r subspace, so it needs more steps than a K/V prefix and can fail where K/V would succeed.
* ``kv`` (tuned): the per-layer K/V themselves as parameters, initialised from compiled. Strongest and
  fastest to tune, but large: ``P x 2 x layers x kv_heads x head_dim`` values (512 KiB per prefix token
  for LLaVA-1.5-7B in fp16), so it is opt-in.

Tuned parameters are rounded to the storage dtype *inside* the optimisation loop (straight-through), so
"exact match" is verified on the very values that get saved. Serialised with ``safetensors`` (bytes,
with ``edit_id``, ``version``, ``kind``, ``format_version`` and the model fingerprint in the metadata).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from safetensors.torch import load as st_load

from .config import AdapterConfig
from .errors import FormatError, InvalidInputError, TuningError
from .families import Family, ModelSpec, PrefixKV, make_cache

__all__ = [
    "ADAPTER_FORMAT_VERSION",
    "Adapter",
    "AdapterConfig",
    "AdapterRuntime",
    "TuneReport",
    "adapter_bytes",
    "soft_rank_for",
    "tuning_examples",
]

logger = logging.getLogger(__name__)

ADAPTER_FORMAT_VERSION = 1
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
AdapterKind = Literal["compiled", "soft", "kv"]
_HEADER_ALLOWANCE = 512  # safetensors JSON header with our metadata is ~400 bytes


_DEFAULT_LR = {"kv": 0.3, "soft": 0.03}


@dataclass
class TuneReport:
    """Outcome of tuning one edit."""

    edit_id: int
    version: int
    kind: str
    exact: bool
    """Every example's greedy continuation equals the target (with ``margin``), on the stored values."""
    steps: int
    seconds: float
    loss: float
    min_margin: float
    n_examples: int


@dataclass
class Adapter:
    """One edit version's prefix, in its stored form."""

    kind: AdapterKind
    edit_id: int
    version: int
    model: str
    """``ModelSpec.fingerprint()`` of the model it was made for."""
    token_ids: torch.Tensor
    """Statement token ids (int64, 1-D); the prefix length P."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """``soft``: ``u`` (P x r), ``v`` (hidden x r); ``kv``: ``k.{layer}`` / ``v.{layer}`` (1 x H x P x D)."""
    exact: bool | None = None
    """For tuned kinds: whether tuning reached an exact match."""
    _digest: str | None = field(default=None, repr=False, compare=False)

    @property
    def digest(self) -> str:
        """Content hash (cached): the K/V LRU key, so a swapped-in tuned adapter never hits stale K/V."""
        if self._digest is None:
            h = hashlib.blake2b(digest_size=8)
            h.update(self.kind.encode())
            h.update(self.token_ids.numpy().tobytes())
            for k in sorted(self.tensors):
                h.update(k.encode())
                h.update(self.tensors[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._digest = h.hexdigest()
        return self._digest

    @property
    def length(self) -> int:
        return int(self.token_ids.numel())

    def to_bytes(self) -> bytes:
        tensors = {"token_ids": self.token_ids.to(torch.int32).contiguous().cpu()}
        tensors.update({k: t.detach().contiguous().cpu() for k, t in self.tensors.items()})
        meta = {
            "format": "esg-memory-adapter",
            "format_version": str(ADAPTER_FORMAT_VERSION),
            "kind": self.kind,
            "edit_id": str(self.edit_id),
            "version": str(self.version),
            "model": self.model,
            "exact": "" if self.exact is None else str(int(self.exact)),
        }
        return _st_dumps(tensors, meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> Adapter:
        try:
            tensors = st_load(bytes(data))
            meta = _read_metadata(data)
        except FormatError:
            raise
        except Exception as exc:  # safetensors raises its own errors on truncated / foreign bytes
            raise FormatError(f"not a readable adapter: {exc}") from exc
        if meta.get("format") != "esg-memory-adapter":
            raise FormatError("not an esg-memory adapter")
        try:
            fv = int(meta["format_version"])
            kind = meta["kind"]
            eid, ver = int(meta["edit_id"]), int(meta["version"])
        except (KeyError, ValueError) as exc:
            raise FormatError(f"adapter metadata incomplete: {exc}") from exc
        if fv > ADAPTER_FORMAT_VERSION:
            raise FormatError(f"adapter format {fv} is newer than supported {ADAPTER_FORMAT_VERSION}")
        if kind not in ("compiled", "soft", "kv") or "token_ids" not in tensors:
            raise FormatError(f"bad adapter kind {kind!r} or missing token ids")
        ids = tensors.pop("token_ids").to(torch.long)
        exact = {"": None, "1": True, "0": False}.get(meta.get("exact", ""))
        return cls(kind, eid, ver, meta.get("model", ""), ids, tensors, exact)

    def stored_bytes(self) -> int:
        return len(self.to_bytes())


_ST_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.int32: "I32",
    torch.int64: "I64",
}


def _st_dumps(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """safetensors bytes with a canonical header (sorted keys, names in order).

    ``safetensors.torch.save`` orders the metadata arbitrarily, so the same adapter would serialise
    to different bytes from call to call; canonical bytes keep saved memories reproducible and
    diffable. The result is standard safetensors (read back with ``safetensors.torch.load``).
    """
    import json
    import struct

    header: dict[str, object] = {"__metadata__": dict(sorted(meta.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data section to 8 bytes
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def _read_metadata(data: bytes) -> dict[str, str]:
    import json
    import struct

    if len(data) < 8:
        raise FormatError("adapter bytes truncated")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise FormatError("adapter header truncated")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as exc:
        raise FormatError(f"adapter header unreadable: {exc}") from exc
    return dict(header.get("__metadata__", {}))


def adapter_bytes(
    spec: ModelSpec, length: int, kind: AdapterKind, rank: int = 4, value_bytes: int = 2, id_bytes: int = 4
) -> int:
    """Payload bytes of one stored adapter (without the small safetensors header)."""
    ids = length * id_bytes
    if kind == "compiled":
        return ids
    if kind == "soft":
        return ids + (length * rank + spec.hidden_size * rank) * value_bytes
    return ids + length * spec.kv_bytes_per_token(value_bytes)


def soft_rank_for(spec: ModelSpec, length: int, config: AdapterConfig | None = None) -> int:
    """Rank of a soft adapter of ``length`` tokens for a model of shape ``spec`` under ``config``."""
    cfg = config or AdapterConfig()
    full = min(length, spec.hidden_size)
    if cfg.soft_rank is not None:
        return min(cfg.soft_rank, full)
    vb = _DTYPES[cfg.storage_dtype].itemsize
    fit = (cfg.soft_budget_bytes - 4 * length - _HEADER_ALLOWANCE) // ((length + spec.hidden_size) * vb)
    return int(max(1, min(full, fit)))


def tuning_examples(
    memory: Any, edit: Any, n_paraphrases: int = 4, n_augmented: int = 2, max_examples: int = 16
) -> list[tuple[Any, str]]:
    """(image, prompt) rows an edit's tuned adapter must answer: the edit input, its stored positives
    (``None`` fields inherit the edit's image / question), question rewrites and image views like the
    ones the memory's scope admits. Deduplicated, at most ``max_examples``."""
    from .augment import augment_image, question_templates

    img = memory.open_image(edit.image) if edit.image else None
    rows: list[tuple[Any, str]] = [(img, edit.question)]
    for pos in edit.positives:
        rows.append((memory.open_image(pos.image) if pos.image else img, pos.text or edit.question))
    rows += [(img, q) for q in question_templates(edit.question, n_paraphrases)]
    if img is not None and n_augmented:
        rows += [(a, edit.question) for a in augment_image(img, n_augmented, seed=int(edit.id))]
    seen: set[tuple[int, str]] = set()
    out = []
    for im, q in rows:
        if (id(im), q) not in seen:
            seen.add((id(im), q))
            out.append((im, q))
    return out[:max_examples]


def _round_st(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Forward sees ``t`` rounded to the storage dtype; gradient passes straight through."""
    return t + (t.to(dtype).to(t.dtype) - t).detach()


class AdapterRuntime:
    """Compiles, tunes and materialises adapters for one (model, processor). Thread-safe LRU of K/V."""

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
    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        emb = self.model.get_input_embeddings().weight
        return emb.device, emb.dtype

    def _kv(self, adapter: Adapter, params: dict[str, torch.Tensor] | None = None) -> PrefixKV:
        """Per-layer K/V of an adapter; differentiable w.r.t. ``params`` when given."""
        device, dtype = self._device_dtype()
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
        device, dtype = self._device_dtype()
        key = (adapter.edit_id, adapter.version, adapter.digest, str(device), dtype)
        with self._lock:
            hit = self._lru.get(key)
            if hit is not None:
                self._lru.move_to_end(key)
                self.hits += 1
                return hit
        with torch.no_grad():
            kv = [(k.detach(), v.detach()) for k, v in self._kv(adapter)]
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
        kv = adapter_bytes(self.spec, length, "kv", value_bytes=_DTYPES[self.config.storage_dtype].itemsize)
        return "kv" if kv <= self.config.soft_budget_bytes else "soft"

    def tune(
        self,
        base: Adapter,
        examples: Sequence[tuple[Any, str]],
        answer: str,
        kind: Literal["auto", "soft", "kv"] | None = None,
    ) -> tuple[Adapter, TuneReport]:
        """Optimise a prefix (base frozen) so every ``(image, prompt)`` example greedily yields ``answer``.

        Only the adapter's parameters receive gradients (``torch.autograd.grad`` on them alone: no base
        parameter ``.grad`` is ever written and no weight is modified).
        """
        cfg = self.config
        kind = self.resolve_kind(kind or cfg.tuned_kind, base.length)
        if not examples:
            raise TuningError("no examples to tune on")
        examples = list(examples)[: cfg.max_examples]
        device = self._device_dtype()[0]
        sdtype = _DTYPES[cfg.storage_dtype]
        params = self._init_params(base, kind, device)
        shell = Adapter(kind, base.edit_id, base.version, self.fingerprint, base.token_ids)
        embeds, mask, positions, target = self._tuning_batch(examples, answer, device, base.length)
        n_t, length, bsz = target.numel(), embeds.shape[1], embeds.shape[0]
        tgt = target.expand(bsz, -1)
        lr = cfg.lr if cfg.lr is not None else _DEFAULT_LR[kind]
        opt = torch.optim.Adam(list(params.values()), lr=lr)
        t0 = time.perf_counter()
        loss_v, margin_v, exact, step = float("nan"), float("-inf"), False, 0
        best: tuple[float, dict[str, torch.Tensor]] = (float("-inf"), {})
        with torch.enable_grad():
            for step in range(1, cfg.max_steps + 1):
                rounded = {k: _round_st(p, sdtype) for k, p in params.items()}
                kv = self._kv(shell, rounded)
                cache = make_cache(
                    self.model, [(k.expand(bsz, -1, -1, -1), v.expand(bsz, -1, -1, -1)) for k, v in kv]
                )
                out = self.model(
                    inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache
                )
                logits = out.logits[:, length - n_t - 1 : length - 1].float()
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1)
                )
                if not torch.isfinite(loss):
                    raise TuningError(f"non-finite loss at step {step}")
                with torch.no_grad():
                    gold = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
                    other = logits.scatter(-1, tgt.unsqueeze(-1), float("-inf")).amax(-1)
                    margin_v = float((gold - other).min())
                loss_v = float(loss.detach())
                if margin_v > best[0]:  # keep the best verified values in case the budget runs out
                    best = (margin_v, {k: p.detach().clone() for k, p in params.items()})
                if margin_v >= cfg.margin:
                    exact = True
                    break
                grads = torch.autograd.grad(loss, list(params.values()))
                for p, g in zip(params.values(), grads, strict=True):
                    p.grad = g
                opt.step()
                opt.zero_grad(set_to_none=True)
        margin_v = best[0]
        params = best[1]
        stored = {k: p.detach().to(sdtype).cpu() for k, p in params.items()}
        tuned = Adapter(kind, base.edit_id, base.version, self.fingerprint, base.token_ids, stored, exact)
        report = TuneReport(base.edit_id, base.version, kind, exact, step, time.perf_counter() - t0, loss_v,
                            margin_v, len(examples))
        logger.info("tuned edit %d v%d (%s): exact=%s steps=%d margin=%.3f in %.2fs", base.edit_id,
                    base.version, kind, exact, step, margin_v, report.seconds)
        return tuned, report

    def _init_params(self, base: Adapter, kind: str, device: torch.device) -> dict[str, torch.nn.Parameter]:
        # float32 master copies whatever the model dtype: Adam on fp16/bf16 values stalls or overflows;
        # the forward casts to the model dtype (``_kv``) after rounding to the storage dtype
        if kind == "kv":
            with torch.no_grad():
                kv = self._kv(base)
            out = {}
            for i, (k, v) in enumerate(kv):
                out[f"k.{i}"] = torch.nn.Parameter(k.detach().float().clone())
                out[f"v.{i}"] = torch.nn.Parameter(v.detach().float().clone())
            return out
        if kind != "soft":
            raise TuningError(f"cannot tune kind {kind!r}")
        if base.kind == "soft":
            return {k: torch.nn.Parameter(t.to(device, torch.float32)) for k, t in base.tensors.items()}
        p_len, hid = base.length, self.spec.hidden_size
        r = self.soft_rank(p_len)
        gen = torch.Generator().manual_seed(self.config.seed)
        scale = float(self.model.get_input_embeddings().weight.detach().float().std())
        v = torch.randn(hid, r, generator=gen) * scale
        return {
            "u": torch.nn.Parameter(torch.zeros(p_len, r, device=device)),
            "v": torch.nn.Parameter(v.to(device)),
        }

    def _tuning_batch(
        self, examples: Sequence[tuple[Any, str]], answer: str, device: torch.device, prefix_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced batch (prompt + target) as merged input embeddings, mask and positions.

        Image features do not depend on the prefix, so the vision tower runs once here instead of at
        every step: the language model's input embeddings (``hidden_states[0]``, images merged) are
        taken from one no-grad forward with explicit positions (which also leaves Qwen's
        ``rope_deltas`` state untouched).
        """
        images = [im for im, _ in examples]
        prompts = [q for _, q in examples]
        enc = self.family.build_inputs(self.processor, images, prompts)
        ref_prompt = self.family.format_prompt(self.processor, prompts[0], images[0] is not None)
        target = self.family.target_ids(self.processor, answer, ref_prompt)
        target = torch.tensor(target, dtype=torch.long, device=device)
        _, dtype = self._device_dtype()
        batch = {
            k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
            if isinstance(v, torch.Tensor)
            else v
            for k, v in enc.items()
        }
        bsz = batch["input_ids"].shape[0]
        tail = target.unsqueeze(0).expand(bsz, -1)
        batch["input_ids"] = torch.cat([batch["input_ids"], tail], dim=1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(tail)], dim=1)
        if "mm_token_type_ids" in batch:
            mm = batch["mm_token_type_ids"]
            batch["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(tail, dtype=mm.dtype)], dim=1)
        mask = batch["attention_mask"]
        plain_pos = self.family.positions(self.model, batch, mask, mask, [0] * bsz)
        with torch.no_grad():
            embeds = self.model(**batch, position_ids=plain_pos, output_hidden_states=True).hidden_states[0]
        full_mask, positions = self.family.prefix_layout(self.model, batch, [prefix_len] * bsz)
        return embeds.detach(), full_mask, positions, target
