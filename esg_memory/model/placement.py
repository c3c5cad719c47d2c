"""`ModuleCalls`: the wrapper's nn.Module-like calls (``to``, ``cuda``, ``cpu``, ``half``, ``eval``, ...).

They act on the base model and return the wrapper (peft's contract), so ``em = em.to("cuda")`` keeps its
edits. K/V prefixes are cached per device and dtype, and adapters are identified by architecture alone,
so a moved or cast model injects the same edits.

A move also moves the memory's key encoder (its ``to(device)``: `esg_memory.encoders.CachedTowers.to`),
and never casts it: keys must stay the float32 ones the scopes' thresholds were fitted on, whatever the
base model is cast to (``em.half()``, ``em.to(torch.bfloat16)`` leave the encoder as it is). An encoder
without a ``to`` is left where it is.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["ModuleCalls", "device_of"]

logger = logging.getLogger("esg_memory.model")


def device_of(args: tuple, kwargs: dict[str, Any]) -> Any:
    """The device a ``Module.to(...)`` call names (None for a cast alone), as torch reads its arguments."""
    if kwargs.get("device") is not None:
        return kwargs["device"]
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (str, torch.device, int)) and not isinstance(a, bool):
            return a
    return None


class ModuleCalls:
    """Mixin of `EditedModel`: needs ``base_model`` and ``memory``; see the module docstring."""

    base_model: Any
    memory: Any

    def _on_base(self, method: str, *args: Any, **kwargs: Any) -> Any:
        getattr(self.base_model, method)(*args, **kwargs)
        return self

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """``base_model.to(...)`` (device and/or dtype); the key encoder follows a device and keeps its
        dtype. Returns this wrapper."""
        device = device_of(args, kwargs)
        self._on_base("to", *args, **kwargs)
        if device is not None:
            self._move_encoder(device)
        return self

    def cuda(self, device: Any = None) -> Any:
        self._on_base("cuda", device)
        self._move_encoder(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")
        return self

    def cpu(self) -> Any:
        self._on_base("cpu")
        self._move_encoder("cpu")
        return self

    def half(self) -> Any:
        return self._on_base("half")

    def bfloat16(self) -> Any:
        return self._on_base("bfloat16")

    def float(self) -> Any:
        return self._on_base("float")

    def eval(self) -> Any:
        return self._on_base("eval")

    def _move_encoder(self, device: Any) -> None:
        encoder = getattr(self.memory, "encoder", None)
        move = getattr(encoder, "to", None)
        if callable(move):
            move(device)
        else:
            logger.debug("key encoder %r has no to(device): left where it is", encoder)
