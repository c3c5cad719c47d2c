"""Prefix adapters: what an in-scope edit injects into the frozen model, and how it is stored.

Three kinds, all resolving to a per-layer K/V prefix at inference (see `esg_memory.model.families`):

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
with ``edit_id``, ``version``, ``kind``, ``format_version`` and the model fingerprint in the metadata) and
stored in the memory as the attachment `ADAPTER_KIND` of each (edit, version).

This module is the stored form and its sizes only; `esg_memory.model.runtime` turns an adapter into K/V
for a model, `esg_memory.model.tuning` tunes one, `esg_memory.model.cache` decides which one is injected.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from safetensors.torch import load as st_load

from ..config import AdapterConfig
from ..errors import FormatError
from .families import ModelSpec

__all__ = [
    "ADAPTER_FORMAT_VERSION",
    "ADAPTER_KIND",
    "STORAGE_TORCH_DTYPES",
    "Adapter",
    "AdapterKind",
    "adapter_bytes",
    "read_metadata",
    "soft_rank_for",
]

ADAPTER_FORMAT_VERSION = 1
ADAPTER_KIND = "adapter"
"""Attachment kind under which an edit version's adapter bytes are stored in the memory."""
STORAGE_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
"""`AdapterConfig.storage_dtype` names to torch dtypes."""
AdapterKind = Literal["compiled", "soft", "kv"]
_KINDS: tuple[str, ...] = get_args(AdapterKind)
_HEADER_ALLOWANCE = 512  # safetensors JSON header with our metadata is ~400 bytes


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
            meta = read_metadata(data)
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
        if kind not in _KINDS or "token_ids" not in tensors:
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


def read_metadata(data: bytes) -> dict[str, str]:
    """The metadata of stored adapter bytes (model fingerprint, edit id, ...) without loading any tensor:
    cheap enough to check every edit of a large memory. `FormatError` when the header is unreadable."""
    if len(data) < 8:
        raise FormatError("adapter bytes truncated")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise FormatError("adapter header truncated")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"adapter header unreadable: {exc}") from exc
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise FormatError("adapter header is not a safetensors header")
    return {str(k): str(v) for k, v in meta.items()}


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
    vb = STORAGE_TORCH_DTYPES[cfg.storage_dtype].itemsize
    fit = (cfg.soft_budget_bytes - 4 * length - _HEADER_ALLOWANCE) // ((length + spec.hidden_size) * vb)
    return int(max(1, min(full, fit)))
