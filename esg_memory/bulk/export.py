"""`export_memory`: a memory's edits as the JSONL import format, with their pictures as files beside it.

``DEST`` ending in ``.jsonl`` is the file; anything else is a folder that gets ``edits.jsonl``. The
pictures go into ``images/`` beside the file, one per stored image, named by its sha256 with the
extension of its format (``images/<sha256>.png``) and holding the very bytes the memory stores — so
`esg_memory.bulk.formats.read_file` of the export stores the same images again (same sha256s), and
export -> import round-trips every edit's id, question, answer, picture, positives and metadata (the
current version of each; history, scopes and feedback are the memory's own and are not exported).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from index import atomic_write_bytes

from ..errors import InvalidInputError

__all__ = ["IMAGES_DIR", "ExportResult", "export_memory"]

logger = logging.getLogger("esg_memory.bulk")

IMAGES_DIR = "images"
_EXT = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}


@dataclass(frozen=True)
class ExportResult:
    """Where one export went and what it wrote."""

    file: str
    images_dir: str
    count: int
    """Edits written."""
    images: int
    """Distinct pictures written."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _extension(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _EXT.get(str(im.format), "img")
    except Exception:  # stored images were decoded when added; an odd one still exports its bytes
        return "img"


def export_memory(memory: Any, dest: str | Path) -> ExportResult:
    """Write every edit of ``memory`` (an `EditMemory`) to ``dest`` (see the module docstring)."""
    d = Path(dest)
    if "\x00" in str(d):
        raise InvalidInputError("the export path contains a NUL character")
    path = d if d.suffix == ".jsonl" else d / "edits.jsonl"
    if path.exists() and not path.is_file():
        raise InvalidInputError(f"cannot export to {str(path)!r}: not a file")
    images = path.parent / IMAGES_DIR
    images.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}

    def picture(sha: str | None) -> str | None:
        if sha is None:
            return None
        if sha not in written:
            data = memory.image_bytes(sha)
            name = f"{sha}.{_extension(data)}"
            target = images / name
            if not (target.is_file() and target.stat().st_size == len(data)):
                atomic_write_bytes(target, data)
            written[sha] = f"{IMAGES_DIR}/{name}"
        return written[sha]

    lines = []
    edits = memory.list()
    for e in edits:
        positives: list[Any] = []
        for p in e.positives:
            if p.image is None:
                positives.append(p.text)
            else:
                positives.append({"text": p.text, "image": picture(p.image)})
        rec = {
            "id": e.id,
            "image": picture(e.image),
            "question": e.question,
            "answer": e.answer,
            "positives": positives,
            "metadata": e.metadata,
        }
        lines.append(json.dumps(rec, ensure_ascii=False, allow_nan=False))
    atomic_write_bytes(path, ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))
    logger.info("exported %d edits and %d images to %s", len(edits), len(written), path)
    return ExportResult(str(path), str(images), len(edits), len(written))
