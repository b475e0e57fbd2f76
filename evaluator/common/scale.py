"""The scale a printed table shows metric values on.

Every stored number is on the metric's raw scale: metrics.json, scores.jsonl, history.jsonl, W&B and MLflow hold
accuracy in [0, 1] and CIDEr-D in [0, 10]. Papers print x100 (BLEU-4 17.2, CIDEr-D 45.1, SPIDEr 29.8, accuracy
61.2), so a printed table may show x100: `tools/bench.py run|eval --x100`, recorder config `scale: 100`. Only the
printing changes; a count (n) is never scaled.
"""
from __future__ import annotations

SCALES = (1, 100)
PAPER_SCALE = 100


def scaled(value: float, scale: float) -> float:
    """`value` as a table on `scale` shows it."""
    return value * scale


def scale_note(scale: float) -> str:
    """The line a table on `scale` carries, "" on the raw scale."""
    return "" if scale == 1 else f"values x{scale:g} (papers' convention; the stored values are raw)"
