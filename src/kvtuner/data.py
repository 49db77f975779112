"""The built-in text: the standard library's ``pydoc_data.topics``, split into disjoint parts.

Each pydoc topic goes wholly to one split, chosen by a hash of its name, so the split is
deterministic and calibration never sees evaluation text.
"""

from __future__ import annotations

import hashlib

SPLITS = ("calibration", "evaluation")


def _is_evaluation(topic: str) -> bool:
    return hashlib.sha256(topic.encode()).digest()[0] % 5 == 0  # about a fifth of the topics


def default_texts(split: str = "calibration") -> str:
    """All topics of one split joined by blank lines (sorted by topic name)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid; allowed: 'calibration' or 'evaluation'")
    from pydoc_data.topics import topics

    want = split == "evaluation"
    return "\n\n".join(topics[k] for k in sorted(topics) if _is_evaluation(k) == want)


def token_ids(tokenizer, text: str, num_tokens: int, *, offset: int = 0):
    """The first ``num_tokens`` token ids of ``text`` after ``offset`` tokens, as a ``[1, n]`` tensor."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < offset + num_tokens:
        raise ValueError(f"num_tokens={num_tokens} (offset {offset}) exceeds the text's {ids.shape[1]} tokens; "
                         f"allowed: at most {ids.shape[1] - offset}")
    return ids[:, offset: offset + num_tokens]
