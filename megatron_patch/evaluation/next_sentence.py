"""A next-sentence multiple-choice task built from plain documents (the shipped zero-shot task).

Units are characters of whitespace-normalised text. An item is ``{"id", "document", "context",
"choices", "label"}``: ``context`` is a passage of consecutive sentences of one document
(``CONTEXT_CHARS`` characters), ``choices[label]`` the sentence that follows it there
(``ANSWER_CHARS``), and the other choices sentences of similar length from other documents, one
document each. Sentences are split at ``.``, ``!`` or ``?`` (closing quotes kept) before a
capital letter, except after a short title such as "Mr.".
"""

import random
import re
from typing import Dict, List, Sequence

CONTEXT_CHARS = (100, 300)  # a passage's length, characters (inclusive)
ANSWER_CHARS = (30, 120)  # the true next sentence's length, characters (inclusive)
DISTRACTOR_RATIO = (0.75, 4 / 3)  # a distractor's length relative to the true sentence's

_BOUNDARY = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z])")
_TITLE = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Esq|Col|Gen|Capt|Mt|Rev|Hon|No)\.$")


def split_sentences(text: str) -> List[str]:
    """Sentences of ``text`` (whitespace collapsed to single spaces), in order."""
    pieces = _BOUNDARY.split(" ".join(text.split()))
    sentences: List[str] = []
    for piece in pieces:
        if sentences and _TITLE.search(sentences[-1]):
            sentences[-1] += " " + piece
        elif piece:
            sentences.append(piece)
    return sentences


def _passage_before(sentences: Sequence[str], i: int) -> int:
    """Start index of the longest run of whole sentences ending just before ``sentences[i]`` that
    fits ``CONTEXT_CHARS[1]`` characters; -1 when that run is shorter than ``CONTEXT_CHARS[0]``."""
    start, length = i, -1
    while start > 0 and length + 1 + len(sentences[start - 1]) <= CONTEXT_CHARS[1]:
        start -= 1
        length += 1 + len(sentences[start])
    return start if length >= CONTEXT_CHARS[0] else -1


def build_items(documents: Sequence[str], per_document: int, choices: int, seed: int) -> List[Dict]:
    """Up to ``per_document`` items per document, each with ``choices`` choices (see the module).

    Positions are drawn without overlap (an item's passage and answer share no sentence with
    another item's of the same document). Documents with no usable position, or for which fewer
    than ``choices - 1`` other documents have a sentence of fitting length, give fewer items.
    """
    rng = random.Random(seed)
    split = [split_sentences(text) for text in documents]
    items: List[Dict] = []
    for doc, sentences in enumerate(split):
        candidates = []
        for i in range(1, len(sentences)):
            if ANSWER_CHARS[0] <= len(sentences[i]) <= ANSWER_CHARS[1]:
                start = _passage_before(sentences, i)
                if start >= 0:
                    candidates.append((start, i))
        rng.shuffle(candidates)
        taken: List[range] = []
        for start, i in candidates:
            if len(taken) == per_document:
                break
            span = range(start, i + 1)
            if any(set(span) & set(other) for other in taken):
                continue
            answer = sentences[i]
            low, high = DISTRACTOR_RATIO[0] * len(answer), DISTRACTOR_RATIO[1] * len(answer)
            others = [d for d in range(len(split)) if d != doc]
            rng.shuffle(others)
            distractors = []
            for other in others:
                fitting = [s for s in split[other] if low <= len(s) <= high and s != answer]
                if fitting:
                    distractors.append(rng.choice(fitting))
                if len(distractors) == choices - 1:
                    break
            if len(distractors) < choices - 1:
                continue
            label = rng.randrange(choices)
            options = distractors[:label] + [answer] + distractors[label:]
            taken.append(span)
            items.append(
                {
                    "id": f"doc{doc}-s{i}",
                    "document": doc,
                    "context": " ".join(sentences[start:i]),
                    "choices": options,
                    "label": label,
                }
            )
    return items
