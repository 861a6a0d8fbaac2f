"""Tables of ``tools/rehearse.py``: the stage rows, and the bundle's file sizes against the chat memory target."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.benchkit.common import markdown_table

GB = 1e9  # decimal gigabytes throughout
TARGET_FACTOR = 1.5  # chat should fit in 1.5 x (GGUF + int8 vision ONNX + projector)
HEADER = ("stage", "wall s", "peak anon GB", "peak resident GB", "disk written GB", "time to first token s", "note")
CHAT_PREFIX = "chat"


@dataclass(frozen=True)
class FileSizes:
    """Sizes in bytes of the files the chat loads, and the memory target derived from them."""

    gguf: str  # file names, relative to the bundle
    vision_int8: str
    projector: str
    gguf_bytes: int
    vision_int8_bytes: int
    projector_bytes: int

    @property
    def target_bytes(self) -> float:
        return TARGET_FACTOR * (self.gguf_bytes + self.vision_int8_bytes + self.projector_bytes)


def file_sizes(bundle: Path) -> FileSizes | None:
    """Sizes of the bundle's GGUF, ``vision_int8`` and ``projector`` graphs — each with its external
    data files (manifest roles ``<role>_data_<i>``) — or None if the manifest lacks one."""
    try:
        manifest: dict[str, Any] = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
        files = manifest["files"]
        names = (manifest["llm"]["gguf"], files["vision_int8"], files["projector"])
        sizes = [(bundle / names[0]).stat().st_size]
        for role in ("vision_int8", "projector"):
            parts = [name for key, name in files.items() if key == role or key.startswith(f"{role}_data_")]
            sizes.append(sum((bundle / name).stat().st_size for name in parts))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return FileSizes(*names, *sizes)


def _gb(value: float) -> str:
    return f"{value / GB:.3f}"


def stage_table(rows: Sequence[Any]) -> str:
    """The markdown table of ``StageRow``-like rows."""
    cells = [[row.stage, f"{row.wall_s:.2f}", _gb(row.peak_anon_bytes), _gb(row.peak_rss_bytes),
              _gb(row.disk_written_bytes), "—" if row.ttft_s is None else f"{row.ttft_s:.3f}", row.note or ""]
             for row in rows]
    return markdown_table(HEADER, cells, "lrrrrrl")


def sizes_table(sizes: FileSizes, rows: Sequence[Any]) -> str:
    """File sizes, 1.5 × their sum, and each chat row's peaks as a multiple of that target."""
    cells = [[f"GGUF {sizes.gguf}", _gb(sizes.gguf_bytes), ""],
             [f"vision ONNX {sizes.vision_int8}", _gb(sizes.vision_int8_bytes), ""],
             [f"projector {sizes.projector}", _gb(sizes.projector_bytes), ""],
             [f"chat memory target ({TARGET_FACTOR} × sum)", _gb(sizes.target_bytes), "1.00"]]
    for row in rows:
        if row.stage.startswith(CHAT_PREFIX):
            for label, value in (("peak resident", row.peak_rss_bytes), ("peak anon", row.peak_anon_bytes)):
                cells.append([f"{row.stage}: {label}", _gb(value), f"{value / max(sizes.target_bytes, 1):.2f}"])
    return markdown_table(("file / peak", "GB", "× target"), cells, "lrr")


def report(rows: Sequence[Any], sizes: FileSizes | None) -> str:
    """Stage table, then (when the exports exist) the sizes table; GB = 10⁹ bytes."""
    parts = [stage_table(rows)]
    if sizes is not None:
        parts.append(sizes_table(sizes, rows))
    parts.append("GB = 10^9 bytes; memory is summed over each stage's process tree (sampled every 50 ms); "
                 "peak resident also takes the kernel's per-process peak (VmHWM)")
    return "\n\n".join(parts)
