"""VQA answers as the official evaluation processes them, and the soft training targets built from them.

Answer processing follows the official VQA evaluation (GT-Vision-Lab/VQA, ``vqaEval.py``),
re-implemented here: whitespace (:func:`clean_whitespace`), punctuation
(:func:`process_punctuation`) and words (:func:`process_digit_article`), all three in
:func:`normalize_answer`. The readers build answer vocabularies (:func:`build_answer_vocab`) and
VQA v2's soft targets (:func:`answer_scores`, :func:`soft_scores`) from it; the metric
(:mod:`fusionzoo.tasks.vqa_eval`) scores with the same steps. Standard library only.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

# --------------------------------------------------------------------------------------
# The official answer processing
# --------------------------------------------------------------------------------------
#: Characters the punctuation step deletes or turns into spaces (the period is handled apart).
PUNCTUATION: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                                ">", "<", "@", "`", ",", "?", "!")

#: Number words the official evaluation maps to digits.
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

#: Words the official evaluation drops.
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

#: The official contractions table: a word written without its apostrophe(s) -> with them.
#: Kept entry for entry, including its oddities: the capitalised keys (``Im``) can never
#: match because words are lower-cased first, and ``somebody'd`` maps to ``somebodyd``.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}

# A digit-comma-digit group ("1,000"): when present, punctuation is deleted rather than spaced.
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official period pattern, kept as written: "(?!<=\d)" is a lookahead that never
# fires (a typo for a lookbehind), so in effect it deletes every period not followed
# by a digit. The official call passes re.UNICODE (32) as `count`: at most 32 deletions.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_MAX_DELETIONS = 32


def clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, then strip (every answer's first step; when legacy, only the prediction's)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official punctuation step (see the module docstring); case and words untouched."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for char in PUNCTUATION:
        # the test looks at the *input* text, the replacement acts on the running output
        if delete_all or (char + " ") in text or (" " + char) in text:
            out = out.replace(char, "")
        else:
            out = out.replace(char, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX_DELETIONS)


def process_digit_article(text: str) -> str:
    """The official word step: lower-case, number words to digits, drop articles, restore contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """All three official steps: whitespace, punctuation, then words.

    What the official evaluation applies to the prediction and the human answers
    when the humans disagree (to the prediction always, when legacy); also the
    form of answer vocabularies and soft targets.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> normalize_answer("dont know"), normalize_answer("3.5"), normalize_answer("1,000")
    ("don't know", '3.5', '1000')
    """
    if not isinstance(answer, str):
        raise TypeError(f"an answer must be a str, got {type(answer).__name__} {answer!r:.60}")
    return _normalize(answer)


@functools.lru_cache(maxsize=1 << 16)
def _normalize(answer: str) -> str:
    # Answers repeat (easy-VQA: 13 strings over 48,248 questions; VQA: "yes", "2", ...), so the
    # pure string pipeline is memoised: loading easy-VQA normalised 86,836 answers in ~1 s.
    return process_digit_article(process_punctuation(clean_whitespace(answer)))



# --------------------------------------------------------------------------------------
# Soft targets
# --------------------------------------------------------------------------------------
def leave_one_out(candidate: str, answers: Sequence[str]) -> float:
    """Mean over the ``len(answers)`` leave-one-out subsets of ``min(1, #matches / 3)``.

    Summed subset by subset in the official order, so the floats agree bit for bit.
    """
    matches = sum(answer == candidate for answer in answers)
    per_subset = [min(1.0, (matches - (answer == candidate)) / 3) for answer in answers]
    return sum(per_subset) / len(per_subset)


def answer_scores(answers: Sequence[str]) -> dict[str, float]:
    """Soft score (0..1] of every distinct normalised answer of one question.

    The VQA v2 soft target: each answer scores the leave-one-out mean of
    :func:`vqa_accuracy`, computed on every human answer processed with
    :func:`normalize_answer` (what predicting it scores in the official
    evaluation when the humans disagree; this does not depend on
    ``legacy_pre_2021``). Empty answers (all punctuation) and answers scoring 0
    (a question with one answer) are left out.

    >>> answer_scores(["2"] * 3 + ["two", "3"] + ["4"] * 5)
    {'2': 1.0, '3': 0.3, '4': 1.0}
    """
    normalised = [normalize_answer(answer) for answer in answers]
    scores = {candidate: leave_one_out(candidate, normalised) for candidate in dict.fromkeys(normalised)}
    return {candidate: score for candidate, score in scores.items() if candidate and score > 0}


def soft_scores(answers: Sequence[str], vocab: Mapping[str, int]) -> dict[int, float]:
    """Soft target of one question over an answer vocabulary: ``{answer index: score}``.

    Args:
        answers: the human answers of the question (any form; they are normalised).
        vocab: normalised answer -> class index (e.g. ``{a: i for i, a in enumerate(build_answer_vocab(...))}``).

    Returns:
        The :func:`answer_scores` of the answers that are in ``vocab``, keyed by
        their index; answers outside the vocabulary are dropped.

    >>> soft_scores(["red"] * 2 + ["dark red"] * 8, {"red": 0, "blue": 1})
    {0: 0.6}
    """
    if not isinstance(vocab, Mapping):
        raise TypeError(f"vocab must map answer -> index (a dict), got {type(vocab).__name__}; "
                        "build it with {answer: i for i, answer in enumerate(answers)}")
    return {vocab[answer]: score for answer, score in answer_scores(answers).items() if answer in vocab}


def build_answer_vocab(answer_lists: Iterable[Sequence[str]], top_k: int | None = 3129,
                       min_count: int = 1) -> list[str]:
    """The answer vocabulary: the ``top_k`` most frequent normalised answers.

    Args:
        answer_lists: the human answers of each training question.
        top_k: vocabulary size (3,129 is the usual VQA v2 vocabulary); ``None`` keeps all.
        min_count: drop answers given fewer times than this.

    Returns:
        Normalised answers, most frequent first, ties in alphabetical order (so the
        result does not depend on the order of the questions). Every human answer
        counts once; answers that normalise to an empty string are dropped.
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive int or None, got {top_k}")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    counts: Counter[str] = Counter()
    for answers in answer_lists:
        if isinstance(answers, str):
            raise TypeError(f"answer_lists must hold one list of answers per question, got the string {answers!r:.60}")
        counts.update(answer for answer in map(normalize_answer, answers) if answer)
    ranked = sorted((item for item in counts.items() if item[1] >= min_count), key=lambda item: (-item[1], item[0]))
    return [answer for answer, _ in ranked[:top_k]]
