"""`ClipKeyEncoder`: keys from any open_clip model, weights loaded offline and safely.

Weights sources (``pretrained=``):

- ``None``: random weights, seeded (``seed=``) so every process builds the same model.
  That is what the registered tiny config ``"esg-tiny-clip"`` is for (tests, demos).
- a local ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file. Safetensors is read with
  ``safetensors``; the others with ``torch.load(weights_only=True)`` and nothing else:
  open_clip's own loader falls back to a full unpickle when ``torch.load`` raises
  ``TypeError``, so we never call it on user files.
- an open_clip pretrained tag (``"laion2b_s34b_b79k"``): resolved from the local Hugging
  Face / ``~/.cache/clip`` caches only. Nothing is downloaded unless ``allow_download=True``,
  so an offline machine gets an immediate, explained :class:`ConfigError` instead of a
  network timeout.

``model_name`` may also be ``"local-dir:/path"`` (a directory with ``open_clip_config.json``
and a weights file, the layout :meth:`ClipKeyEncoder.save_pretrained` writes) or
``"hf-hub:org/repo"`` (resolved from the local HF cache under the same rule).

``encoder.name`` records the architecture and the weights' identity (a SHA-256 prefix of the
weights file, or ``random-seed<k>``) plus the fusion settings, so a saved memory can refuse
keys from another encoder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, FormatError
from .base import CachedTowers, check_fuse, sha256_file

__all__ = ["TINY_CLIP_NAME", "ClipKeyEncoder", "register_tiny_clip"]

logger = logging.getLogger(__name__)

#: open_clip config name of the tiny offline test/demo model (random weights, seeded).
TINY_CLIP_NAME = "esg-tiny-clip"
_TINY_CLIP_CONFIG = Path(__file__).resolve().parent.parent / "assets" / "open_clip" / f"{TINY_CLIP_NAME}.json"
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_PP_KEYS = ("mean", "std", "interpolation", "resize_mode")
# open_clip's own preference order for a checkpoint inside a model directory
_DIR_WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)


class _DropInitNotice(logging.Filter):
    """Hide open_clip's root-logger "initialized randomly" notice: we load weights ourselves after."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("No pretrained weights loaded") or "initialized partially" in msg)


@contextlib.contextmanager
def _quiet_init() -> Iterator[None]:
    root = logging.getLogger()
    f = _DropInitNotice()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def register_tiny_clip() -> None:
    """Make ``"esg-tiny-clip"`` an open_clip model name (idempotent; called lazily, not at import)."""
    import open_clip

    if TINY_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(_TINY_CLIP_CONFIG)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix not in _WEIGHT_SUFFIXES:
        raise ConfigError(f"weights file {path.name!r}: expected one of {_WEIGHT_SUFFIXES}")
    if not path.is_file():
        raise ConfigError(f"weights file not found: {str(path)!r}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise FormatError(f"weights file {path.name!r} could not be read ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FormatError(f"weights file {path.name!r} holds no state dict of tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _load_weights(model: torch.nn.Module, path: Path, arch: str) -> None:
    """open_clip's `load_checkpoint` massaging, minus its pickle fallback."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    sd = convert_state_dict(model, _read_state_dict(path))
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for k in ("logit_scale", "logit_bias"):
        p = getattr(model, k, None)
        if k in sd and p is not None and p.ndim != sd[k].ndim:
            sd[k] = sd[k].reshape(p.shape)
    if "logit_bias" not in sd and getattr(model, "logit_bias", None) is not None and "logit_scale" in sd:
        sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])
    sd.pop("text.transformer.embeddings.position_ids", None)
    try:
        resize_pos_embed(sd, model)
        resize_text_pos_embed(sd, model)
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        raise FormatError(f"weights file {path.name!r} does not fit the {arch!r} architecture: {e}") from None


#: Upper bounds on a directory config's sizes: a hostile config must not make open_clip allocate
#: without limit before any weights are read. Generous: ViT-bigG-14 is well inside every one.
_CFG_LIMITS = {
    "embed_dim": 16384,
    "width": 16384,
    "head_width": 4096,
    "heads": 512,
    "layers": 256,
    "mlp_ratio": 64,
    "image_size": 4096,
    "patch_size": 1024,
    "context_length": 8192,
    "vocab_size": 4_000_000,
}
_MAX_TOWER_PARAMS = 8e9  # ~12 * layers * width^2 per transformer tower


def _check_size(key: str, v: Any, at: str, where: str) -> None:
    for y in v if isinstance(v, list) else [v]:
        number = isinstance(y, (int, float)) and not isinstance(y, bool)
        if y is not None and not (number and 0 < y <= _CFG_LIMITS[key]):
            raise FormatError(f"{where}: {at}.{key} = {v!r} is out of range (0, {_CFG_LIMITS[key]}]")


def _check_model_cfg(model_cfg: dict, where: str) -> None:
    """Refuse out-of-range sizes in an open_clip model config (FormatError names the field)."""

    def walk(x: Any, at: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k in _CFG_LIMITS:
                    _check_size(k, v, at, where)
                walk(v, f"{at}.{k}")
        elif isinstance(x, list):
            for i, y in enumerate(x):
                walk(y, f"{at}[{i}]")

    walk(model_cfg, "model_cfg")
    for tower in ("vision_cfg", "text_cfg"):
        t = model_cfg.get(tower)
        w, n = (t.get("width"), t.get("layers")) if isinstance(t, dict) else (None, None)
        if isinstance(w, (int, float)) and isinstance(n, int) and 12 * n * float(w) ** 2 > _MAX_TOWER_PARAMS:
            raise FormatError(f"{where}: {tower} (width {w}, {n} layers) is implausibly large")


def _find_dir_weights(d: Path) -> Path | None:
    for name in _DIR_WEIGHT_NAMES:
        if (d / name).is_file():
            return d / name
    found = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in _WEIGHT_SUFFIXES)
    found.sort(key=lambda p: p.suffix.lower() != ".safetensors")  # prefer safetensors, stable otherwise
    if len(found) > 1:
        logger.warning("several weight files in %s; using %s", d, found[0].name)
    return found[0] if found else None


def _cfg_name(model_cfg: dict) -> str:
    """A built-in name when a directory's config is a known architecture, else a config hash."""
    import open_clip

    for name in open_clip.list_models():
        if open_clip.get_model_config(name) == model_cfg:
            return name
    blob = json.dumps(model_cfg, sort_keys=True).encode()
    return "cfg-" + hashlib.sha256(blob).hexdigest()[:12]


def _resolve_tag(arch: str, tag: str, allow_download: bool, cache_dir: str | None) -> tuple[Path, dict]:
    """The local file of an open_clip pretrained tag, and the tag's config (GELU, preprocessing)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ConfigError(
            f"pretrained={tag!r} is neither an existing weights file nor a pretrained tag of {arch!r} "
            f"(tags: {tags or 'none'})"
        )
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, fname = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        fname = fname or "open_clip_pytorch_model.bin"
        names = [fname]
        if fname.endswith((".bin", ".pth")):  # open_clip prefers a safetensors twin
            names.insert(
                0,
                "open_clip_model.safetensors"
                if fname == "open_clip_pytorch_model.bin"
                else fname[:-4] + ".safetensors",
            )
        for n in names:
            p = try_to_load_from_cache(repo, n, cache_dir=cache_dir)
            if isinstance(p, str):
                return Path(p), cfg
    url = cfg.get("url", "")
    if url:
        p = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(url)
        if p.is_file():
            return p, cfg
    if not allow_download:
        raise ConfigError(
            f"weights for {arch!r} pretrained={tag!r} are not in the local cache and esg-memory does not "
            "download by default: pass a local .safetensors/.pt file or a 'local-dir:' directory, or "
            "allow_download=True on a machine with network access"
        )
    try:
        return Path(open_clip.download_pretrained(cfg, cache_dir=cache_dir)), cfg
    except Exception as e:
        raise ConfigError(
            f"downloading {arch!r} pretrained={tag!r} failed ({type(e).__name__}: {e})"
        ) from None


def _hub_dir(repo: str, allow_download: bool, cache_dir: str | None) -> Path:
    from huggingface_hub import try_to_load_from_cache

    p = try_to_load_from_cache(repo, "open_clip_config.json", cache_dir=cache_dir)
    if isinstance(p, str):
        return Path(p).parent
    if not allow_download:
        raise ConfigError(
            f"'hf-hub:{repo}' is not in the local Hugging Face cache and downloads are off "
            "(allow_download=False); use a 'local-dir:' directory or a weights file"
        )
    try:
        from open_clip.pretrained import download_pretrained_from_hf

        cfg_path = download_pretrained_from_hf(repo, filename="open_clip_config.json", cache_dir=cache_dir)
        download_pretrained_from_hf(repo, cache_dir=cache_dir)
    except Exception as e:
        raise ConfigError(f"downloading 'hf-hub:{repo}' failed ({type(e).__name__}: {e})") from None
    return Path(cfg_path).parent


class ClipKeyEncoder(CachedTowers):
    """Keys from an open_clip model's image and text towers (see the module docstring).

    Args:
        model_name: an open_clip architecture (``open_clip.list_models()``, plus
            ``"esg-tiny-clip"``), ``"local-dir:<dir>"`` or ``"hf-hub:<org/repo>"``.
        pretrained: ``None`` (seeded random weights), a local weights file, or a pretrained
            tag found in the local cache (its QuickGELU / preprocessing settings are applied
            as open_clip does). Must be ``None`` with a ``local-dir:``/``hf-hub:`` name. A
            bare file carries no such settings: OpenAI-trained weights need the
            ``*-quickgelu`` architecture name.
        fuse: ``"sum"`` | ``"concat"`` | ``"product"``: how an image+text row becomes one key.
        image_weight: the image's share ``w`` in ``[0, 1]`` for ``"sum"``/``"concat"``.
        device: torch device the model runs on.
        cache_size: embeddings kept in the content-hash LRU cache (0 disables it).
        seed: seed of the random initialisation (used only without weights).
        batch_size: rows per forward pass.
        allow_download: let open_clip fetch a tag's weights when they are not cached.
        cache_dir: where tags are looked up (and downloaded to); default: the HF / clip caches.
    """

    def __init__(
        self,
        model_name: str = TINY_CLIP_NAME,
        pretrained: str | os.PathLike | None = None,
        *,
        fuse: str = "sum",
        image_weight: float = 0.5,
        device: str | torch.device = "cpu",
        cache_size: int = 4096,
        seed: int = 0,
        batch_size: int = 64,
        allow_download: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        import open_clip

        self.image_weight = check_fuse(fuse, image_weight)
        self.fuse = fuse
        self._init_cache(cache_size, batch_size)
        if not isinstance(model_name, str) or not model_name.strip():
            raise ConfigError(f"model_name must be a non-empty string, got {model_name!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"bad device {device!r}: {e}") from None
        register_tiny_clip()
        from ..pretrained import is_pretrained_name, pretrained_path

        # A shipped name with default options is all a saved memory needs to rebuild this encoder
        # (`EditMemory.load(dir)` without encoder=); local paths are never recorded: they are machine paths.
        shipped = is_pretrained_name(model_name) or model_name == TINY_CLIP_NAME
        defaults = fuse == "sum" and image_weight == 0.5 and seed == 0
        self.spec: str | None = model_name if shipped and pretrained is None and defaults else None
        if is_pretrained_name(model_name) and pretrained is None:
            # a model shipped inside the package (esg_memory/assets/<name>/) is a local-dir: model
            model_name = f"local-dir:{pretrained_path(model_name)}"

        weights: Path | None = None
        tag_cfg: dict = {}
        if model_name.startswith(("local-dir:", "hf-hub:")):
            if pretrained is not None:
                raise ConfigError(
                    f"pretrained= cannot be combined with {model_name!r} (weights come from there)"
                )
            if model_name.startswith("hf-hub:"):
                d = _hub_dir(model_name[len("hf-hub:") :], allow_download, cache_dir)
            else:
                d = Path(model_name[len("local-dir:") :]).expanduser()
            model_cfg = self._read_dir_config(d)
            weights = _find_dir_weights(d)
            if weights is None and model_name.startswith("hf-hub:"):
                raise ConfigError(f"{model_name!r}: no weights file in the cached snapshot {str(d)!r}")
            arch = _cfg_name(model_cfg)
            build_name = f"local-dir:{d}"
        else:
            arch = model_name
            if arch not in open_clip.list_models():
                raise ConfigError(
                    f"unknown open_clip model {arch!r}; known: {', '.join(open_clip.list_models())} "
                    "(or 'local-dir:<dir>')"
                )
            model_cfg = open_clip.get_model_config(arch)
            build_name = arch
            if pretrained is not None:
                p = Path(os.fspath(pretrained)).expanduser()
                if p.is_file() or p.suffix.lower() in _WEIGHT_SUFFIXES or os.sep in str(pretrained):
                    weights = p
                else:
                    weights, tag_cfg = _resolve_tag(arch, str(pretrained), allow_download, cache_dir)
        if weights is not None and not weights.is_file():
            raise ConfigError(f"weights file not found: {str(weights)!r}")
        if tag_cfg.get("quick_gelu") and not model_cfg.get("quick_gelu"):
            # recorded so that save_pretrained's directory rebuilds the same activation, and named
            # ("ViT-B-32-quickgelu"): same weights under another activation give other keys
            model_cfg = {**model_cfg, "quick_gelu": True}
            arch = _cfg_name(model_cfg)

        try:
            # seeded init on the CPU generator (fork_rng keeps the caller's RNG state untouched)
            with torch.random.fork_rng(devices=[]), _quiet_init():
                torch.manual_seed(seed)
                model = open_clip.create_model(
                    build_name,
                    load_weights=False,
                    device="cpu",
                    pretrained_image=False,
                    pretrained_text=False,
                    # what open_clip itself applies for a tag (e.g. OpenAI weights need QuickGELU)
                    force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                    force_preprocess_cfg={k: tag_cfg[k] for k in _PP_KEYS if k in tag_cfg} or None,
                )
            tokenizer = open_clip.get_tokenizer(build_name)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(
                f"open_clip could not build {model_name!r} offline ({type(e).__name__}: {e})"
            ) from None
        if weights is not None:
            _load_weights(model, weights, arch)
            weights_id = "sha256-" + sha256_file(weights)[:16]
        else:
            weights_id = f"random-seed{seed}"
            if arch != TINY_CLIP_NAME:
                logger.warning("%s has random weights (seed %d): its keys carry no meaning", model_name, seed)
        model = model.to(self.device).eval()
        for prm in model.parameters():
            prm.requires_grad_(False)
        #: the open_clip model (eval mode, frozen); its tokenizer and eval-time image transform
        self.model = model
        self.tokenizer = tokenizer
        self._model_cfg = model_cfg
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self._pp_cfg = dict(open_clip.get_model_preprocess_cfg(model))
        self.preprocess = image_transform_v2(PreprocessCfg(**self._pp_cfg), is_train=False)
        self.arch = arch
        self.weights_id = weights_id
        self.embed_dim = int(self._forward_texts(["a"]).shape[1])
        self.dim = self.embed_dim * 2 if fuse == "concat" else self.embed_dim
        tail = f":iw={self.image_weight:g}" if fuse != "product" else ""
        self.name = f"open_clip:{arch}:{weights_id}:fuse={fuse}{tail}"

    @staticmethod
    def _read_dir_config(d: Path) -> dict:
        if not d.is_dir():
            raise ConfigError(f"'local-dir:' directory not found: {str(d)!r}")
        f = d / "open_clip_config.json"
        if not f.is_file():
            raise ConfigError(f"{str(d)!r} has no open_clip_config.json")
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise FormatError(f"{str(f)!r} is not valid JSON ({type(e).__name__}: {e})") from None
        model_cfg = cfg.get("model_cfg") if isinstance(cfg, dict) else None
        if not isinstance(model_cfg, dict) or not all(
            k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")
        ):
            raise FormatError(f"{str(f)!r} lacks a 'model_cfg' with embed_dim, vision_cfg and text_cfg")
        _check_model_cfg(model_cfg, str(f))
        return model_cfg

    def _forward_images(self, images: list[Image.Image]) -> np.ndarray:
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        with torch.inference_mode():
            return self.model.encode_image(x, normalize=True).float().cpu().numpy()

    def _forward_texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts).to(self.device)
        with torch.inference_mode():
            return self.model.encode_text(tokens, normalize=True).float().cpu().numpy()

    def with_fusion(self, fuse: str, image_weight: float = 0.5) -> ClipKeyEncoder:
        """A view sharing this model and cache but fusing differently (for sweeps; no reload)."""
        w = check_fuse(fuse, image_weight)
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.fuse, other.image_weight = fuse, w
        other.dim = self.embed_dim * 2 if fuse == "concat" else self.embed_dim
        tail = f":iw={w:g}" if fuse != "product" else ""
        other.name = f"open_clip:{self.arch}:{self.weights_id}:fuse={fuse}{tail}"
        return other

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``open_clip_config.json`` + ``open_clip_model.safetensors`` (atomically).

        The directory loads back with ``ClipKeyEncoder("local-dir:<directory>")`` and gives
        the same keys; use it to freeze a seeded random model into a weights file.
        """
        from safetensors.torch import save_file

        from index import NotReplaceableError, atomic_directory, check_replaceable

        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.model.state_dict().items()}
        pp = {k: list(v) if isinstance(v, tuple) else v for k, v in self._pp_cfg.items()}
        try:
            check_replaceable(directory, "open_clip_config.json")
        except NotReplaceableError as e:
            raise ConfigError(f"cannot save the encoder there: {e}") from None
        with atomic_directory(directory, "open_clip_config.json") as tmp:
            (tmp / "open_clip_config.json").write_text(
                json.dumps({"model_cfg": self._model_cfg, "preprocess_cfg": pp}, indent=2), encoding="utf-8"
            )
            save_file(state, str(tmp / "open_clip_model.safetensors"), metadata={"format": "pt"})
        return Path(directory)
