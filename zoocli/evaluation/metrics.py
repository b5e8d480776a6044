"""Scoring: VQA normalised match, POPE yes/no metrics, multiple-choice letter extraction.

* ``normalize_answer`` is the VQA evaluation normalisation (``vqaEval.py`` of the VQA API, also
  used by LLaVA's TextVQA evaluator): lower-case; punctuation removed or turned into a space (a
  comma between digits is dropped, so "1,000" -> "1000"); a period is dropped unless a digit
  follows ("5." -> "5", "3.5" kept); number words zero-ten -> digits; articles a/an/the removed;
  contractions written without an apostrophe get it back ("dont" -> "don't").
* ``vqa_accuracy``: with alternatives, 1 if the prediction matches any; with human answers
  (``soft``), the VQA soft accuracy min(#matching humans / 3, 1), averaged over the
  leave-one-human-out subsets exactly as the official evaluator does (10 answers: 0/1/2/3/4+
  matches -> 0, 0.3, 0.6, 0.9, 1.0). ``leave_one_out=False`` gives the plain min(#match / 3, 1).
* ``extract_yes_no``: the first standalone "yes" or "no" word, else None (counted wrong).
  ``yes_no_metrics``: accuracy, precision, recall, F1, yes-ratio with "yes" positive (POPE). A
  ratio with a zero denominator is 0.0.
* ``extract_choice``: "B", "(B)", "B.", "B) text", "The answer is B", "Answer: (B)", "option B",
  or the text of one choice.

All scores are fractions in [0, 1].
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

from zoocli.errors import ZooError
from zoocli.evaluation.samples import LETTERS, Sample

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "id've": "i'd've",
    "i'dve": "i'd've", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]
# as written in vqaEval.py: "(?!<=" is a lookahead, so any period not followed by a digit goes
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The VQA evaluation normalisation of one answer string."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str], soft: bool = False,
                 leave_one_out: bool = True) -> float:
    """Normalised match of ``prediction`` against ``answers`` (alternatives, or human answers
    when ``soft``; see the module docstring)."""
    if not answers:
        raise ValueError("no reference answers")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if not soft or len(gts) == 1:
        return float(pred in gts)
    matches = sum(g == pred for g in gts)
    if not leave_one_out:
        return min(1.0, matches / 3)
    n = len(gts)
    # leaving out a matching human leaves matches-1, leaving out another leaves matches
    return (matches * min(1.0, (matches - 1) / 3) + (n - matches) * min(1.0, matches / 3)) / n


# --------------------------------------------------------------------------- yes / no

_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def extract_yes_no(text: str) -> str | None:
    """"yes" or "no": the first such standalone word in ``text`` (any case); else None."""
    m = _YES_NO.search(text)
    return m.group(1).lower() if m else None


def majority(answers: Sequence[str]) -> str:
    """The most common normalised answer (ties: the one seen first)."""
    counts = Counter(a.strip().lower().rstrip(".") for a in answers)
    return max(counts, key=lambda a: (counts[a], -list(counts).index(a)))


def yes_no_metrics(predicted: Sequence[str | None], labels: Sequence[str]) -> dict:
    """POPE metrics, "yes" positive. ``predicted`` items are "yes", "no" or None (unreadable:
    wrong, neither a positive nor a negative prediction)."""
    if len(predicted) != len(labels):
        raise ValueError(f"{len(predicted)} predictions for {len(labels)} labels")
    tp = fp = tn = fn = 0
    for p, y in zip(predicted, labels):
        if y == "yes":
            tp += p == "yes"
            fn += p != "yes"
        else:
            fp += p == "yes"
            tn += p == "no"
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n, "accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
        "f1": f1, "yes_ratio": (tp + fp) / n if n else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "unreadable": sum(p is None for p in predicted),
    }


# --------------------------------------------------------------------------- multiple choice

_ANSWER_IS = re.compile(
    r"\b(?:answer|option|choice)\s*(?:is|:)?\s*(?:option\s*|choice\s*)?[:\s]*\(?([A-Z])\)?(?![A-Za-z])",
    re.IGNORECASE)


def extract_choice(text: str, choices: Sequence[str]) -> str | None:
    """The letter (A, B, ...) a free-text answer picks among ``choices``, or None."""
    letters = LETTERS[: len(choices)]
    t = text.strip()
    bare = t.rstrip(".").strip().strip("()").strip()
    if len(bare) == 1 and bare.upper() in letters:  # "B", "b", "(B)", "B."
        return bare.upper()
    m = re.match(r"^\(?([A-Z])(?:\)|\.|:|\))(?:\s|$)", t) or re.match(r"^\(([A-Z])\)", t)
    if m and m.group(1) in letters:  # "B. Paris", "(B) Paris", "B) Paris", "B: Paris"
        return m.group(1)
    for m in _ANSWER_IS.finditer(t):  # "The answer is B", "Answer: (B)", "option B"
        if m.group(1).upper() in letters and (m.group(1).isupper() or m.group(0)[-1] == ")"):
            return m.group(1).upper()
    norm = normalize_answer(t)
    texts = [normalize_answer(c) for c in choices]
    exact = [letters[i] for i, c in enumerate(texts) if c and c == norm]
    if len(exact) == 1:
        return exact[0]
    padded = f" {norm} "
    found = [i for i, c in enumerate(texts) if c and f" {c} " in padded]
    # drop a choice whose text is inside another found choice ("red" inside "dark red")
    found = [i for i in found if not any(j != i and f" {texts[i]} " in f" {texts[j]} "
                                         and texts[i] != texts[j] for j in found)]
    if len(found) == 1:
        return letters[found[0]]
    return None


# --------------------------------------------------------------------------- per sample / dataset


def score_one(sample: Sample, prediction: str) -> tuple[float, str | None]:
    """(score in [0, 1], what was read from the prediction) for one sample.

    yesno: the extracted yes/no word, scored against the answers; mc: the extracted letter;
    vqa: the normalised prediction, scored with ``vqa_accuracy``.
    """
    if sample.answers is None:
        raise ZooError(f"sample {sample.id} has no reference answers; give an answers file to score it")
    if not isinstance(prediction, str):
        raise ZooError(f"sample {sample.id}: the prediction must be a string, got {type(prediction).__name__}")
    if sample.kind == "yesno":
        word = extract_yes_no(prediction)
        if word is None:
            return 0.0, None
        return vqa_accuracy(word, sample.answers, soft=sample.soft), word
    if sample.kind == "mc":
        letter = extract_choice(prediction, sample.choices or [])
        return float(letter is not None and letter in sample.answers), letter
    return vqa_accuracy(prediction, sample.answers, soft=sample.soft), normalize_answer(prediction)


def score_predictions(samples: Sequence[Sample], predictions: Mapping[str, str] | Sequence[str]) -> dict:
    """Score one dataset. ``predictions``: {sample id: text} or a list in sample order.

    Returns ``{"n", "score", "by_kind": {kind: {"n", "score"}}}`` plus ``"yesno"`` (the POPE
    metrics over the yes/no samples) when there are any. ``score`` is the mean per-sample score.
    """
    if isinstance(predictions, Mapping):
        missing = [s.id for s in samples if s.id not in predictions]
        if missing:
            raise ZooError(f"{len(missing)} of {len(samples)} samples have no prediction "
                           f"(first: {missing[0]})")
        preds = [predictions[s.id] for s in samples]
    else:
        preds = list(predictions)
        if len(preds) != len(samples):
            raise ZooError(f"{len(preds)} predictions for {len(samples)} samples")
    if not samples:
        raise ZooError("no samples to score")
    scores, by_kind, yn_pred, yn_gold = [], {}, [], []
    for s, p in zip(samples, preds):
        sc, got = score_one(s, p)
        scores.append(sc)
        by_kind.setdefault(s.kind, []).append(sc)
        if s.kind == "yesno":
            yn_pred.append(got)
            yn_gold.append(majority(s.answers))
    out = {"n": len(scores), "score": sum(scores) / len(scores),
           "by_kind": {k: {"n": len(v), "score": sum(v) / len(v)} for k, v in sorted(by_kind.items())}}
    if yn_pred:
        out["yesno"] = yes_no_metrics(yn_pred, yn_gold)
    return out
