"""Text metrics: exact_match, token_f1 (SQuAD v1.1/v2.0 rules) and multiple-choice accuracy.

Pure Python, no torch: the daemon venv's tests import this module directly. The rules are written where they
are applied and copied into docs/metrics.md; change both together.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Optional

from evaluator.common.errors import EvaluatorError

from . import MetricInput, MetricResult
from .stats import category_groups, mean_metric

# ---------------------------------------------------------------------------------------------------------------
# SQuAD exact match / token F1


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation, in its order: lowercase, delete ASCII punctuation, drop the words a/an/the,
    collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_pair(prediction: str, gold: str) -> tuple[str, str]:
    """(prediction, gold) normalised by SQuAD's rules; where those leave nothing of the gold (a letter answer 'A',
    'The'), without dropping the articles, and where even that leaves nothing (punctuation only), as written,
    lowercased. SQuAD's golds never normalise to nothing; here an empty answer would match such a gold."""
    g = normalize_answer(gold)
    if g:
        return normalize_answer(prediction), g
    def light(x: str) -> str:
        return " ".join("".join(ch for ch in x.lower() if ch not in set(string.punctuation)).split())
    if light(gold):
        return light(prediction), light(gold)
    return " ".join(prediction.lower().split()), " ".join(gold.lower().split())


def exact_match_score(prediction: str, gold: str) -> float:
    pred, ref = normalize_pair(prediction, gold)
    return float(pred == ref)


def f1_score(prediction: str, gold: str) -> float:
    """SQuAD token F1 on normalised tokens. If either side has no tokens, F1 is 1 when both are empty, else 0
    (the SQuAD v2.0 rule; v1.1 would divide by zero)."""
    pred, ref = (side.split() for side in normalize_pair(prediction, gold))
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _golds(sample) -> list[str]:
    """The target plus any references: every acceptable answer (SQuAD takes the max over them)."""
    return [sample.target] + [r for r in (sample.references or []) if r != sample.target]


def _best_gold(prediction: str, sample, score) -> tuple[float, str]:
    """(score, gold answer) for the gold that scores best (the first of equals)."""
    golds = _golds(sample)
    scored = [score(prediction, g) for g in golds]
    best = max(range(len(golds)), key=scored.__getitem__)
    return scored[best], golds[best]


def _squad_metric(inp: MetricInput, name: str, score) -> MetricResult:
    scores, compared = [], []
    for pred, s, ok in zip(inp.predictions, inp.samples, inp.ok):
        # failed inference: 0, shown against the target (the gold an empty answer is measured by)
        value, gold = _best_gold(pred, s, score) if ok else (0.0, s.target)
        scores.append(value)
        shown, reference = normalize_pair(pred if ok else "", gold)
        compared.append({"prediction": shown, "reference": reference})
    result = MetricResult()
    mean_metric(name, scores, category_groups(inp.samples), result)
    result.compared[name] = compared
    return result


def exact_match(inp: MetricInput, names: list[str]) -> MetricResult:
    """1 if the normalised prediction equals a normalised gold answer; failed inference scores 0.
    compared: the normalised prediction and the normalised gold it scored best against."""
    return _squad_metric(inp, "exact_match", exact_match_score)


def token_f1(inp: MetricInput, names: list[str]) -> MetricResult:
    """SQuAD token F1 against the best gold answer; failed inference scores 0."""
    return _squad_metric(inp, "token_f1", f1_score)


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice: which choice does a free-text answer pick?

LETTERS = string.ascii_uppercase
# (b), [b], a capital not starting a word, or a small letter that ends the text or is followed by punctuation
# ('answer is b.' -> B, but 'answer is a dog' is not A)
_LETTER = r"(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Z])(?![\w'’])|([a-z])(?=\s*$|[.,;:!?]))"
_BARE = re.compile(r"[(\[]?([A-Za-z])[)\]]?[.:]?")
_ANSWER_PHRASE = re.compile(
    r"(?i:\banswer\b)(?:\s+(?i:is|would\s+be|should\s+be|will\s+be))?\s*[:\-]?\s*(?:(?i:option|choice)\s+)?"
    + _LETTER)
_OPTION_PHRASE = re.compile(r"(?i:\b(?:option|choice)\b)\s*[:\-]?\s*" + _LETTER)
_LEADING = re.compile(r"(?:[(\[]([A-Za-z])[)\]]|([A-Z])[).:]|([a-z])\))(?=\s|$)")
_PAREN = re.compile(r"\(([A-Za-z])\)")
_THINK_END = "</think>"
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)


def _mc_norm(s: str) -> str:
    """Choice-matching normalisation: lowercase, punctuation -> space, collapse whitespace (articles kept:
    choices like 'Speaker A' / 'Speaker B' differ only by a letter)."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", s.lower()).split())


def _letter(match: re.Match) -> str:
    return next(g for g in match.groups() if g).upper()


def _index(letter: str, n_choices: int) -> Optional[int]:
    i = LETTERS.find(letter)
    return i if 0 <= i < n_choices else None


def _unique(indices) -> Optional[int]:
    found = {i for i in indices if i is not None}
    return found.pop() if len(found) == 1 else None


def _phrase_pick(text: str, m: re.Match, normed_choices: list, choices: list) -> Optional[int]:
    """Rule 3 for one answer phrase: 'Answer: A dog barking' names the choice 'A dog barking' (its text follows the
    phrase), not the letter A; only when no choice's text follows does the letter count."""
    written = text[m.start(m.lastindex):]
    tail = _mc_norm(written)
    following = [i for i, c in enumerate(normed_choices) if c and (tail == c or tail.startswith(c + " "))]
    if len({normed_choices[i] for i in following}) == 1 and len({choices[i].strip() for i in following}) == 1:
        return following[0]
    if following:  # choices alike once normalised ('C', 'C++'): the longest one written there, else no answer
        said = written.casefold()
        as_written = [i for i in following if said.startswith(choices[i].strip().casefold())]
        longest = [i for i in as_written if len(choices[i].strip()) == max(len(choices[j].strip()) for j in as_written)]
        return longest[0] if longest and len({choices[i].strip() for i in longest}) == 1 else None
    return _index(_letter(m), len(normed_choices))


def extract_choice(response: str, choices: list[str]) -> Optional[int]:
    """The index of the choice a free-text answer picks, or None when it cannot be told (counted as unparsed).

    Preprocessing: keep only the text after the last `</think>`; if an `<answer>...</answer>` block is present
    keep the last one's content; delete `*` and backticks (markdown emphasis); strip.
    Then the first rule that gives an answer wins (a letter outside A..<k-th letter> gives none):
      1. the whole text equals one choice's text: as written (case and a final '.' aside), else lowercased with
         punctuation -> space when that names one choice text only ('1' and '-1' are not told apart that way)
      2. the whole text is a letter: B, b, (B), [B], B), B., B:
      3. an answer phrase: 'answer is B', 'Answer: (B)', 'the answer would be option C'; when a choice's text
         follows the phrase ('Answer: A dog barking.') that choice counts, not the letter; the letter must be
         in brackets, a capital not starting a word ('answer is A dog' -> A, 'answer is Apple' -> none), or
         a small letter ending the text or followed by punctuation ('answer is b.' -> B, 'answer is a dog'
         -> none); when several appear the last one counts (models revise: 'Answer: A ... final answer: B')
      4. 'option B' / 'choice B' phrases naming exactly one distinct letter
      5. a leading letter: '(B) ...', '[B] ...', 'B) ...', 'b) ...', 'B. ...', 'B: ...''
      6. exactly one choice text appears as whole words in the text (a choice that is part of another
         matching choice, e.g. 'dog' in 'dog barking', does not count)
      7. exactly one distinct bracketed letter '(B)' appears anywhere
    """
    k = len(choices)
    text = response
    if _THINK_END in text:
        text = text.rsplit(_THINK_END, 1)[1]
    tags = _ANSWER_TAG.findall(text)
    if tags:
        text = tags[-1]
    text = text.replace("*", "").replace("`", "").strip()
    if not text:
        return None
    norm = _mc_norm(text)
    normed_choices = [_mc_norm(c) for c in choices]

    said = " ".join(text.casefold().rstrip(".").split())
    verbatim = [i for i, c in enumerate(choices) if " ".join(c.casefold().split()) == said]  # 1: as written
    if verbatim:
        return verbatim[0]  # duplicate choices: the first (the same text)
    exact = [i for i, c in enumerate(normed_choices) if c and c == norm]  # 1: normalised
    if exact and len({choices[i].strip() for i in exact}) == 1:  # '1' vs '-1', 'C' vs 'C++': not told apart here
        return exact[0]
    m = _BARE.fullmatch(text)  # 2
    if m and _index(m.group(1).upper(), k) is not None:
        return _index(m.group(1).upper(), k)
    phrases = [_phrase_pick(text, m, normed_choices, choices) for m in _ANSWER_PHRASE.finditer(text)]  # 3
    phrases = [i for i in phrases if i is not None]
    if phrases:
        return phrases[-1]
    option = _unique(_index(_letter(m), k) for m in _OPTION_PHRASE.finditer(text))  # 4
    if option is not None:
        return option
    m = _LEADING.match(text)  # 5
    if m and _index(_letter(m), k) is not None:
        return _index(_letter(m), k)
    padded = f" {norm} "
    inside = [i for i, c in enumerate(normed_choices) if c and f" {c} " in padded]  # 6
    contained = _unique(i for i in inside if not any(  # drop choices that are part of a longer matching one
        normed_choices[j] != normed_choices[i] and f" {normed_choices[i]} " in f" {normed_choices[j]} " for j in inside))
    if contained is not None:
        return contained
    kept = [i for i in inside if not any(
        normed_choices[j] != normed_choices[i] and f" {normed_choices[i]} " in f" {normed_choices[j]} " for j in inside)]
    if len({normed_choices[i] for i in kept}) == 1:  # choices alike once normalised ('1/2', '1 2'): as written
        written = _unique(i for i in kept if choices[i].strip().casefold() in text.casefold())
        if written is not None:
            return written
    return _unique(_index(m.group(1).upper(), k) for m in _PAREN.finditer(text))  # 7


def resolve_target(sample) -> int:
    """The gold choice index: the target is one of the choices (the first of duplicates) or else read by the same
    rules as answers (e.g. a letter)."""
    if sample.target in sample.choices:
        return sample.choices.index(sample.target)
    index = extract_choice(sample.target, sample.choices)
    if index is None:
        letters = f"A-{LETTERS[len(sample.choices) - 1]}"
        raise EvaluatorError(f"sample {sample.id!r}: target {sample.target!r} is neither one of its choices "
                             f"nor a letter {letters}")
    return index


def accuracy(inp: MetricInput, names: list[str]) -> MetricResult:
    """Multiple-choice accuracy, plus unparsed_rate: the share of samples (of all n) that answered but whose
    answer picks no choice. Unparsed and failed samples count as wrong; failed ones are not 'unparsed'.
    compared: the picked choice (None when none was picked) and the target, as choice_label shows them."""
    correct, unparsed, compared = [], [], []
    for pred, s, ok in zip(inp.predictions, inp.samples, inp.ok):
        gold = resolve_target(s)
        picked = extract_choice(pred, s.choices) if ok else None
        # compared by text as written: with duplicate choices ('True', 'False', 'True') either copy is the right
        # answer, while '1' and '-1' (alike once punctuation is dropped) are different ones
        correct.append(float(picked is not None and s.choices[picked].strip() == s.choices[gold].strip()))
        unparsed.append(float(ok and picked is None))
        compared.append({"prediction": None if picked is None else choice_label(s.choices, picked),
                         "reference": choice_label(s.choices, gold)})
    result = MetricResult()
    groups = category_groups(inp.samples)
    mean_metric("accuracy", correct, groups, result)
    mean_metric("unparsed_rate", unparsed, groups, result)
    result.compared["accuracy"] = compared
    return result


def choice_label(choices: list[str], index: int) -> str:
    """How a picked or gold choice is shown: its letter and text, '(B) cat meowing'."""
    return f"({LETTERS[index]}) {choices[index]}"
