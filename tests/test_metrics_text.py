"""Text metrics and the registry, run in the daemon venv: the registry and text.py are pure Python."""
from __future__ import annotations

import math

import pytest

from evaluator.benchmarks.dataset import Sample
from evaluator.common.errors import EvaluatorError
from evaluator.stages.evaluation.metrics import METRICS, MetricInput, compute, expand
from evaluator.stages.evaluation.metrics.caption import sbert_model_and_label
from evaluator.stages.evaluation.metrics.text import extract_choice, f1_score, normalize_answer

CHOICES = ["dog barking", "cat meowing", "rain", "dog"]


def sample(i, **kw) -> Sample:
    return Sample(id=f"s{i}", messages=[{"role": "user", "content": "q"}], **kw)


def run(names, preds, samples, ok=None, options=None):
    return compute(names, MetricInput(predictions=preds, samples=samples, ok=ok or [True] * len(preds),
                                      options=options or {}, cache_dir=""))


# ---------------------------------------------------------------------------------------------------------------
# multiple-choice answer extraction (docs/metrics.md lists the same rules)

@pytest.mark.parametrize("response, expected", [
    ("B", 1), ("b", 1), ("(B)", 1), ("B)", 1), ("B.", 1), ("[B]", 1), ("B:", 1), ("  B \n", 1), ("**B**", 1),
    ("The answer is (B)", 1), ("The answer is B.", 1), ("Answer: B", 1), ("answer: (c)", 2),
    ("The correct answer is option C", 2), ("the answer is b", 1), ("The answer is c.", 2),
    ("the answer is a dog", 3),  # 'a' starts words here, so no letter; 'dog' is the one choice named
    ("b) cat meowing", 1), ("My answer would be D", 3), ("The answer is B, a cat meowing.", 1),
    ("Answer: A ... no wait, final answer: C", 2),  # the last answer phrase counts
    ("cat meowing", 1), ("Cat meowing.", 1), ("I hear a cat meowing in the clip", 1),
    ("It is a dog barking.", 0),  # 'dog' is part of the longer matching choice 'dog barking'
    ("A dog.", 3),  # a leading article 'A' is not a letter answer; 'dog' is the one choice named
    ("B. cat meowing", 1), ("(C) rain", 2), ("C: rain is falling", 2),
    ("I would pick option B here", 1), ("I think (C) fits best", 2),
    ("<think>maybe A or B</think>The answer is D", 3), ("<answer>C</answer>", 2),
])
def test_mc_answer_is_extracted_from_free_text(response, expected):
    assert extract_choice(response, CHOICES) == expected


@pytest.mark.parametrize("response", [
    "", "   ", "E", "(E)", "The answer is E",  # letters outside the 4 choices
    "The answer is Apple",  # a capital starting a word is not a letter answer
    "dog barking and rain",  # two choices named
    "No idea", "Answer: I am not sure",
    "Either (A) or (C)",  # two bracketed letters
])
def test_mc_answer_that_names_no_single_choice_is_unparsed(response):
    assert extract_choice(response, CHOICES) is None


def test_choice_text_wins_over_a_letter_when_the_choices_are_letters():
    assert extract_choice("A", ["B", "A"]) == 1


def test_accuracy_accepts_the_target_as_letter_or_choice_text_and_counts_unparsed():
    samples = [sample(0, choices=CHOICES, target="B"), sample(1, choices=CHOICES, target="rain"),
               sample(2, choices=CHOICES, target="(A)"), sample(3, choices=CHOICES, target="dog"),
               sample(4, choices=CHOICES, target="A")]
    preds = ["The answer is (B)", "C", "cat meowing", "no idea", "B"]
    r = run(["accuracy"], preds, samples, ok=[True, True, True, True, False])
    # right, right, wrong, unparsed, failed (wrong, but not 'unparsed': it never answered)
    assert r.per_sample["accuracy"] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert r.per_sample["unparsed_rate"] == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert r.values["accuracy"] == pytest.approx(0.4)
    assert r.values["unparsed_rate"] == pytest.approx(0.2)


def test_a_target_that_is_no_choice_is_an_error_naming_the_sample():
    with pytest.raises(EvaluatorError, match=r"sample 's7'.*'piano'.*A-D"):
        run(["accuracy"], ["A"], [sample(7, choices=CHOICES, target="piano")])


# ---------------------------------------------------------------------------------------------------------------
# exact match / token F1 (SQuAD rules)

@pytest.mark.parametrize("text, normalised", [
    ("The Cat!", "cat"), ("  an   apple, a pear ", "apple pear"), ("Theatre", "theatre"), ("U.S.A.", "usa"),
])
def test_squad_normalisation(text, normalised):
    assert normalize_answer(text) == normalised


@pytest.mark.parametrize("pred, gold, em, f1", [
    ("The cat.", "cat", 1.0, 1.0),
    ("a black cat", "the cat", 0.0, 2 * (1 / 2) * 1 / (1 / 2 + 1)),
    ("dog", "cat", 0.0, 0.0),
    ("", "cat", 0.0, 0.0),
    # a gold SQuAD's normalisation leaves nothing of (a letter answer 'A'): compared with its articles kept,
    # so an empty or other answer never matches it (SQuAD's script gave these 1)
    ("the", "a", 0.0, 0.0),
    ("", "A", 0.0, 0.0),
    ("The", "A", 0.0, 0.0),
    ("a", "A", 1.0, 1.0),
    ("(A)", "A", 1.0, 1.0),
    ("", "The The", 0.0, 0.0),
    ("?", "?!", 0.0, 0.0),  # punctuation only: as written
    ("cat cat dog", "cat dog dog", 0.0, 2 / 3),
])
def test_exact_match_and_token_f1(pred, gold, em, f1):
    r = run(["exact_match", "token_f1"], [pred], [sample(0, target=gold)])
    assert r.values["exact_match"] == em
    assert r.values["token_f1"] == pytest.approx(f1)
    assert f1_score(pred, gold) == pytest.approx(f1)


def test_exact_match_takes_the_best_of_target_and_references_and_failed_inference_scores_zero():
    s = [sample(0, target="New York", references=["NYC", "New York City"]), sample(1, target="cat")]
    r = run(["exact_match", "token_f1"], ["nyc", "cat"], s, ok=[True, False])
    assert r.per_sample["exact_match"] == [1.0, 0.0]
    assert r.per_sample["token_f1"] == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------
# aggregation: stderr and per-category, against a hand computation

def test_stderr_and_per_category_match_a_hand_computation():
    cats = ["x", "x", "y", "y", "y"]
    samples = [sample(i, target="red car", category=c) for i, c in enumerate(cats)]
    preds = ["Red car.", "zzz", "red car", "the red car", "red"]  # EM 1,0,1,1,0 ; F1 1,0,1,1,2/3
    r = run(["exact_match", "token_f1"], preds, samples)
    assert r.values["exact_match"] == pytest.approx(0.6)
    # sample std (ddof=1) of [1,0,1,1,0]: sqrt(((0.4^2)*3 + (0.6^2)*2) / 4) = sqrt(0.3); / sqrt(5)
    assert r.stderr["exact_match"] == pytest.approx(math.sqrt(0.3) / math.sqrt(5), rel=1e-12)
    f1 = [1, 0, 1, 1, 2 / 3]
    m = sum(f1) / 5
    assert r.stderr["token_f1"] == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in f1) / 4 / 5), rel=1e-12)
    assert r.per_category == {
        "x": {"n": 2, "exact_match": 0.5, "token_f1": 0.5},
        "y": {"n": 3, "exact_match": pytest.approx(2 / 3), "token_f1": pytest.approx((2 + 2 / 3) / 3)},
    }


def test_samples_without_category_are_grouped_as_none_only_when_others_have_one():
    no_cats = run(["exact_match"], ["a", "b"], [sample(0, target="a"), sample(1, target="a")])
    assert no_cats.per_category == {}
    mixed = run(["exact_match"], ["a", "b"], [sample(0, target="a", category="x"), sample(1, target="a")])
    assert mixed.per_category == {"x": {"n": 1, "exact_match": 1.0}, "(none)": {"n": 1, "exact_match": 0.0}}


def test_a_single_sample_has_no_stderr():
    r = run(["exact_match"], ["a"], [sample(0, target="a")])
    assert r.values == {"exact_match": 1.0} and r.stderr == {}


# ---------------------------------------------------------------------------------------------------------------
# the registry

def test_unknown_metric_names_a_close_match():
    with pytest.raises(EvaluatorError, match=r"unknown metric 'cider'.*did you mean 'cider_d'"):
        run(["cider"], ["a"], [sample(0, references=["a"])])


def test_a_sample_missing_what_a_metric_needs_is_named():
    samples = [sample(0, references=["a cat"]), sample(1, target="cat")]
    with pytest.raises(EvaluatorError, match=r"'cider_d' needs 'references'.*sample 's1'"):
        run(["cider_d"], ["a", "b"], samples)
    with pytest.raises(EvaluatorError, match=r"'accuracy' needs 'target'.*sample 's0'"):
        run(["accuracy"], ["A"], [sample(0, choices=["x", "y"])])


def test_bleu_expands_to_its_four_orders_and_repeats_are_dropped():
    assert expand(["bleu", "bleu_2", "cider_d"]) == ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider_d"]


def test_every_registered_metric_names_a_lazy_function_and_a_known_need():
    for name, spec in METRICS.items():
        assert spec.name == name
        assert spec.needs in ("target", "references", "choices", None)
        assert spec.func.count(":") == 1 and spec.func.startswith("evaluator.stages.evaluation.metrics.")
    assert METRICS["llm_judge"].func == "evaluator.stages.evaluation.metrics.judge:llm_judge"


@pytest.mark.parametrize("model, name", [
    ("paraphrase-TinyBERT-L6-v2", "sbert_sim"),  # the published model keeps the plain name
    ("sentence-transformers/paraphrase-TinyBERT-L6-v2", "sbert_sim"),
    ("/models/all-MiniLM-L6-v2", "sbert_sim_minilm_l6"),
    ("/models/all-mpnet-base-v2/", "sbert_sim_all_mpnet_base_v2"),
])
def test_sbert_metric_name_says_which_model(model, name):
    assert sbert_model_and_label({"sbert_model": model}) == (model, name)


@pytest.mark.parametrize("answer, expected", [
    ("Answer: A dog barking.", 1),       # the choice's text follows the phrase: not the letter A
    ("The answer is A dog barking", 1),
    ("Answer: A", 0),
    ("Answer: C. Rain falling", 2),
])
def test_answer_phrase_followed_by_a_choice_text_that_starts_with_a_capital_letter(answer, expected):
    from evaluator.stages.evaluation.metrics.text import extract_choice
    assert extract_choice(answer, ["A cat meowing", "A dog barking", "Rain falling"]) == expected


def test_duplicate_choices_score_by_text_and_never_fail_the_stage():
    from evaluator.benchmarks.dataset import Sample
    from evaluator.stages.evaluation.metrics import MetricInput, compute
    samples = [Sample(id="1", messages=[{"role": "user", "content": "q"}], choices=["True", "False", "True"],
                      target="True"),
               Sample(id="2", messages=[{"role": "user", "content": "q"}], choices=["Dog", "dog.", "Cat"],
                      target="Cat")]
    res = compute(["accuracy"], MetricInput(predictions=["(C)", "Cat"], samples=samples, ok=[True, True],
                                            options={}, cache_dir=""))
    assert res.values["accuracy"] == 1.0
