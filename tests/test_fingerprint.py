"""A benchmark's settings fingerprint: what changes its numbers changes it, what cannot does not, and the
difference reads as the operator would say it. Pure: milliseconds, no venvs."""
from __future__ import annotations

import os

from evaluator.daemon import fingerprint as F
from evaluator.daemon import policy as P
from evaluator.daemon.config import BenchmarkConfig


def spec(**kw) -> BenchmarkConfig:
    return BenchmarkConfig(**{"name": "qa", "type": "dataset", "dataset": "/data/qa", **kw})


def fp(bench, seed=0, digest="d1"):
    return F.fingerprint(F.settings(bench, seed, digest))


def test_generation_metrics_seed_and_data_change_the_fingerprint():
    base = fp(spec(generation={"max_new_tokens": 8}))
    assert fp(spec(generation={"max_new_tokens": 2})) != base
    assert fp(spec(generation={"max_new_tokens": 8}, metrics=["exact_match"])) != base
    assert fp(spec(generation={"max_new_tokens": 8}), seed=1) != base
    assert fp(spec(generation={"max_new_tokens": 8}), digest="d2") != base
    assert fp(spec(generation={"max_new_tokens": 8}, backend="openai")) != base


def test_name_main_metric_error_budget_and_dataset_path_do_not_change_it():
    base = fp(spec())
    assert fp(spec(name="qa2", main_metric="exact_match", max_error_rate=0.5, dataset="/mnt/other/qa")) == base


def test_changes_read_as_key_paths_with_old_and_new_values():
    old = F.settings(spec(generation={"max_new_tokens": 8}), 0, "d1")
    new = F.settings(spec(generation={"max_new_tokens": 2, "temperature": 0.5}), 0, "d2")
    assert F.changes(old, new) == ["dataset content changed", "generation.max_new_tokens: 8 -> 2",
                                   "generation.temperature: - -> 0.5"]


def test_dataset_digest_follows_text_content_and_audio_sizes_not_the_folder(tmp_path):
    def make(root, target="4", clip=b"RIFF0000"):
        os.makedirs(root / "audio", exist_ok=True)
        (root / "test.jsonl").write_text('{"id": "1", "target": "%s"}\n' % target)
        (root / "metadata.json").write_text('{"dataset_id": "x"}')
        (root / "audio" / "a.wav").write_bytes(clip)
        return str(root)

    a = F.dataset_digest(make(tmp_path / "a"))
    assert F.dataset_digest(make(tmp_path / "b")) == a  # the same data elsewhere
    assert F.dataset_digest(make(tmp_path / "c", target="5")) != a  # an edited reference
    assert F.dataset_digest(make(tmp_path / "d", clip=b"RIFF0001")) == a  # audio: path and size only
    assert F.dataset_digest(make(tmp_path / "e", clip=b"RIFF00001")) != a
    assert F.dataset_digest(None) is None


def test_hold_reason_names_the_missing_dataset_first_then_a_data_problem_then_changed_settings():
    assert P.hold_reason("qa", "/data/qa", "no metrics", {"abc": 2}, {}).startswith("dataset /data/qa does not exist")
    assert P.hold_reason("qa", None, "no metrics to compute", {"abc": 2}, {}) == "no metrics to compute"
    why = P.hold_reason("qa", None, None, {"abc": 2, "def": 1}, {"abc": ["seed: 0 -> 7"], "def": ["seed: 0 -> 7"]})
    assert "settings changed since 3 result(s)" in why and why.count("seed: 0 -> 7") == 1
    assert "rerun" in why and "invalidate" in why
    assert P.hold_reason("qa", None, None, {}, {}) is None


def test_turning_on_vllms_weight_reload_does_not_change_it():
    """weight_reload gives the same numbers (an engine kept, the weights reloaded: scripts/check_vllm_reload.py);
    counting it held the benchmark for 'changed settings' until every earlier result was re-run."""
    base = fp(spec(backend="vllm", backend_options={"max_model_len": 1024}))
    assert fp(spec(backend="vllm", backend_options={"max_model_len": 1024, "weight_reload": True})) == base
