"""The built-in text: the standard library's ``pydoc_data.topics``, split into disjoint parts.

Each pydoc topic goes wholly to one split: topics are ordered by a hash of their name and the
first ones, up to a fifth of all characters, are held out for evaluation. The split is
deterministic and calibration never sees evaluation text.

The topics are those of the running Python, and they change between Python versions (3.11.7: 464,970
characters, 3.12.1: 492,155, 3.13.0: 510,586), so built-in-text figures compare only within one version.
"""

from __future__ import annotations

import hashlib

SPLITS = ("calibration", "evaluation")


EVALUATION_SHARE = 0.2


def _evaluation_topics(topics: dict[str, str]) -> set[str]:
    order = sorted(topics, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    budget, chosen, used = EVALUATION_SHARE * sum(map(len, topics.values())), set(), 0
    for name in order:
        if used + len(topics[name]) > budget:
            continue
        chosen.add(name)
        used += len(topics[name])
    return chosen


def default_texts(split: str = "calibration") -> str:
    """All topics of one split joined by blank lines (sorted by topic name)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid; allowed: 'calibration' or 'evaluation'")
    from pydoc_data.topics import topics

    held_out = _evaluation_topics(topics)
    want = split == "evaluation"
    return "\n\n".join(topics[k] for k in sorted(topics) if (k in held_out) == want)


def token_ids(tokenizer, text: str, num_tokens: int, *, offset: int = 0):
    """The first ``num_tokens`` token ids of ``text`` after ``offset`` tokens, as a ``[1, n]`` tensor."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < offset + num_tokens:
        raise ValueError(f"num_tokens={num_tokens} (offset {offset}) exceeds the text's {ids.shape[1]} tokens; "
                         f"allowed: at most {ids.shape[1] - offset}")
    return ids[:, offset: offset + num_tokens]
