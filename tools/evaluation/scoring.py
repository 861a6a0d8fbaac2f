"""Answer scoring of the benchmarks: VQA normalisation and soft accuracy, MME yes/no, acc/acc+.

The normalisation is the EvalAI answer processor of the official VQA evaluation, in the form
LLaVA's TextVQA evaluation uses (``m4c_evaluator.EvalAIAnswerProcessor``): it is applied to the
prediction *and* to every human answer, always. (The original ``vqaEval.py`` skips it when all
ten humans typed the same string; the two agree except for predictions that differ from such a
unanimous answer only in punctuation, articles or number words.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: in effect "a period not followed by a digit"
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
PERIOD_STRIP_COUNT = int(re.UNICODE)  # sic: the official code passes re.UNICODE (32) as ``count``
HUMANS_FOR_FULL_CREDIT = 3  # VQA: an answer given by 3 of the other humans scores 1

# VizWiz: refusals the model may phrase differently from the annotators' "unanswerable"
UNANSWERABLE = "unanswerable"
REFUSALS = frozenset({"", "unanswerable", "not answerable", "unknown", "cannot answer", "can't answer",
                      "cannot tell", "can't tell", "cannot be determined", "can't be determined",
                      "i don't know", "not sure"})

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def _process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The EvalAI answer processing: lower case, punctuation, number words, articles, contractions.

    Example: "Two" -> "2", "a dog." -> "dog", "dont" -> "don't", "1,000" -> "1000", "3.5" -> "3.5".
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy in [0, 1]: the mean over each human i of min(#other humans who gave the
    (normalised) prediction / 3, 1), i.e. the average over the 10 choose-9 subsets.

    Example: 10 answers of which 2 say "2" and the prediction is "two" -> (2·1/3 + 8·2/3) / 10 = 0.6.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer, got none")
    pred = normalize_answer(prediction)
    matches = [normalize_answer(a) == pred for a in answers]
    total = sum(matches)
    return sum(min(1.0, (total - m) / HUMANS_FOR_FULL_CREDIT) for m in matches) / len(matches)


def vizwiz_prediction(prediction: str) -> str:
    """A VizWiz prediction for scoring: refusals (and an empty answer) become "unanswerable".

    Example: "Unknown." -> "unanswerable", "I don't know" -> "unanswerable", "red" -> "red".
    """
    return UNANSWERABLE if normalize_answer(prediction) in REFUSALS else prediction


def vizwiz_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy after :func:`vizwiz_prediction`. Example: "unknown" vs 10 × "unanswerable" -> 1.0."""
    return vqa_accuracy(vizwiz_prediction(prediction), answers)


def exact_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer, else 0.0 (easy-VQA).

    Example: "A circle." vs ["circle"] -> 1.0.
    """
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(a) == pred for a in answers))


def mme_label(prediction: str) -> str:
    """The MME toolkit's parse: "yes"/"no" when the lower-cased answer is one, else by its first
    4 characters ("yes" tested first), else "other". Example: "Yes, it is" -> "yes", "Not sure" -> "no"."""
    pred = prediction.strip().lower()
    if pred in ("yes", "no"):
        return pred
    if "yes" in pred[:4]:
        return "yes"
    return "no" if "no" in pred[:4] else "other"


def mme_correct(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when :func:`mme_label` of the prediction equals the (single) ground truth, else 0.0."""
    return float(mme_label(prediction) == answers[0].strip().lower())


@dataclass(frozen=True)
class MmeResult:
    """One MME subtask: acc and acc+ in [0, 1] and the score (acc + acc+) × 100 in [0, 200]."""

    acc: float
    acc_plus: float  # share of images whose questions are all correct
    questions: int
    images: int

    @property
    def score(self) -> float:
        return 100.0 * (self.acc + self.acc_plus)


def mme_subtask(outcomes: Iterable[tuple[str, float]]) -> MmeResult:
    """acc/acc+ from ``(image_id, correct)`` pairs of one subtask.

    Example: image a: [1, 1], image b: [1, 0] -> acc 0.75, acc+ 0.5, score 125.
    """
    per_image: dict[str, list[float]] = {}
    for image_id, correct in outcomes:
        per_image.setdefault(image_id, []).append(correct)
    if not per_image:
        raise ValueError("an MME subtask needs at least one answered question")
    flat = [c for cs in per_image.values() for c in cs]
    plus = [float(all(c == 1.0 for c in cs)) for cs in per_image.values()]
    return MmeResult(sum(flat) / len(flat), sum(plus) / len(plus), len(flat), len(plus))


def mme_totals(subtasks: dict[str, MmeResult]) -> dict[str, float]:
    """``score`` (sum over all subtasks, as VisionZip's Table 1 reports MME), ``perception``,
    ``cognition`` (sums over the subtasks of each category that are present)."""
    return {"score": sum(r.score for r in subtasks.values()),
            "perception": sum(r.score for name, r in subtasks.items() if name in MME_PERCEPTION),
            "cognition": sum(r.score for name, r in subtasks.items() if name in MME_COGNITION)}
