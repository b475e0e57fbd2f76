"""The scale a printed table shows metric values on.

Every stored number is on the metric's raw scale: metrics.json, scores.jsonl, history.jsonl, W&B and MLflow hold
accuracy in [0, 1] and CIDEr-D in [0, 10]. Papers print x100 (BLEU-4 17.2, CIDEr-D 45.1, SPIDEr 29.8, accuracy
61.2), so a printed table may show x100: `tools/bench.py run|eval --x100`, recorder config `scale: 100`. Only the
printing changes; a count (n, judged, ...) or a value on a scale of its own (an LLM judge's 1-10 score) is never
scaled.
"""
from __future__ import annotations

SCALES = (1, 100)
PAPER_SCALE = 100


# the metric outputs that are counts, or on a scale of their own (evaluation/metrics: judge.py, mmau.py), as
# metrics.json names them; a leaderboard column `<benchmark>.<output>` is judged by its last part
UNSCALED = frozenset({"n", "judged", "judge_unparsed", "judge_errors", "score", "baseline_score",
                      "mmau_pro_judge_unparsed", "mmau_pro_judge_errors", "mmau_pro_embed_no_answer",
                      "mmau_pro_if_unknown"})


def scaled(value: float, scale: float, name: str = "") -> float:
    """`value` of the metric output `name` as a table on `scale` shows it."""
    return value if name.rsplit(".", 1)[-1] in UNSCALED else value * scale


def scale_note(scale: float) -> str:
    """The line a table on `scale` carries, "" on the raw scale."""
    return "" if scale == 1 else f"values x{scale:g} (papers' convention; the stored values are raw)"
