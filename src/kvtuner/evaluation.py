"""Quality of a plan, measured through the real cache (prefill, then teacher-forced decode)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .models import with_cache
from .spec import KVPlan


def make_cache(model: Any, plan: KVPlan | None):
    """A :class:`MixedPrecisionCache` for ``plan``, or a full-precision ``DynamicCache`` for None."""
    from transformers import DynamicCache

    from .cache import MixedPrecisionCache

    if plan is None:
        return DynamicCache(config=model.config)
    return MixedPrecisionCache(plan, model.config)


def kl_sum(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Sum over positions of KL(ref || other) for ``[positions, vocab]`` log-probabilities."""
    return (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum().item()


def side_by_side(windows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Token windows (``[N]`` or ``[1, N]``) stacked into one ``[B, N]`` batch per length, in first-seen order."""
    by_length: dict[int, list[torch.Tensor]] = {}
    for ids in windows:
        by_length.setdefault(ids.shape[-1], []).append(ids.reshape(-1, ids.shape[-1]))
    return [torch.cat(rows) for rows in by_length.values()]


@torch.no_grad()
def stream_logits(model: Any, input_ids: torch.Tensor, plan: KVPlan | None, *, prefill: int, chunk_size: int,
                  on_step: Any = None, first: int = 0) -> torch.Tensor:
    """Logits ``[B, N - first, vocab]`` at positions ``first..N-1`` of ``input_ids`` ``[B, N]``, fed
    through one cache.

    The first ``prefill`` tokens go in one forward pass, the rest ``chunk_size`` tokens at a time
    (teacher forcing), so quantized history, residual window and group flushes are all exercised.
    The rows are independent windows of equal length (no padding): a batch of windows measures
    exactly what the same windows one by one would. ``on_step()`` is called after each forward pass.
    """
    cache = make_cache(model, plan)
    ids = input_ids.to(model.device)
    n = ids.shape[1]
    if not 0 <= first < n:
        raise ValueError(f"first={first} is invalid; allowed: 0 <= first < {n}")
    bounds = [0, *range(min(n, prefill), n, chunk_size), n]
    out = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        keep = stop - max(start, first)
        if keep <= 0:  # only the cache is needed from this pass (the LM head is a fifth of a small model)
            model(ids[:, start:stop], **with_cache(model, cache), use_cache=True, logits_to_keep=1)
        else:
            out.append(model(ids[:, start:stop], **with_cache(model, cache), use_cache=True,
                             logits_to_keep=keep).logits)
        if on_step is not None:
            on_step()
    return torch.cat(out, dim=1)


@torch.no_grad()
def perplexity(model: Any, input_ids: torch.Tensor, plan: KVPlan | None = None, *, prefill: int | None = None,
               chunk_size: int = 1) -> float:
    """Perplexity of ``input_ids`` ``[1, N]`` with the KV cache of ``plan`` (None: full precision).

    Tokens flow through the cache as in :func:`stream_logits` (``prefill`` defaults to
    ``chunk_size``); every token after the first is scored.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)} is invalid; allowed: [1, N] with N >= 2")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} is invalid; allowed: >= 1")
    logits = stream_logits(model, input_ids, plan, prefill=prefill or chunk_size, chunk_size=chunk_size)[0]
    targets = input_ids[0, 1:].to(logits.device)
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1].float(), targets).item())


# ---------------------------------------------------------------------- full quality report
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


@dataclass
class QualityReport:
    """Quality of one plan against the same model with a full-precision cache, on the same tokens."""

    plan: str
    equivalent_bits: float
    bytes_per_token: float
    ppl: float
    full_ppl: float
    kl: float  # mean KL(full || quantized) of next-token distributions
    top1: float  # fraction of positions whose argmax agrees with full precision
    tokens_scored: int
    generation_agreement: float  # fraction of greedy continuations identical to full precision
    generation_prefix: float  # mean number of leading generated tokens identical to full precision
    passkey: dict[int, float] = field(default_factory=dict)  # context length -> exact-match accuracy
    full_passkey: dict[int, float] = field(default_factory=dict)
    # per text window: mean NLL (nats/token) with the plan minus with full precision; their spread
    # is the noise floor of the PPL comparison (one window's PPL moves by percents on its own)
    window_nll_delta: list[float] = field(default_factory=list)
    # per text window: mean KL(full || quantized), so that two plans can be compared window by window
    window_kl: list[float] = field(default_factory=list)

    def ppl_delta_interval(self, z: float = 2.0) -> tuple[float, float]:
        """PPL ratio - 1 at mean(window deltas) -/+ ``z`` standard errors (windows as samples)."""
        d = torch.tensor(self.window_nll_delta, dtype=torch.float64)
        if len(d) < 2:
            raise ValueError(f"{len(d)} windows is invalid for an interval; allowed: at least 2")
        half = z * d.std().item() / math.sqrt(len(d))
        return math.expm1(d.mean().item() - half), math.expm1(d.mean().item() + half)

    def kl_ratio_interval(self, other: QualityReport, z: float = 2.0) -> tuple[float, float, float]:
        """KL of this report over ``other``'s, window by window (the same windows): the geometric mean
        of the per-window ratios and its ``z``-standard-error interval (windows as samples)."""
        if len(self.window_kl) != len(other.window_kl) or len(self.window_kl) < 2:
            raise ValueError(f"{len(self.window_kl)} and {len(other.window_kl)} windows are invalid for a paired "
                             "ratio; allowed: the same count, at least 2")
        d = torch.tensor(self.window_kl, dtype=torch.float64).clamp_min(1e-12).log() \
            - torch.tensor(other.window_kl, dtype=torch.float64).clamp_min(1e-12).log()
        half = z * d.std().item() / math.sqrt(len(d))
        return math.exp(d.mean().item()), math.exp(d.mean().item() - half), math.exp(d.mean().item() + half)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Reference:
    logprobs: list[torch.Tensor]
    generations: list[torch.Tensor]
    passkey: dict[int, float]


class Evaluator:
    """Runs plans through the real cache and compares them with full precision.

    Protocol per text window: prefill ``prefill`` tokens, then ``decode`` teacher-forced decode
    steps of one token, so quantized history, residual window and group flushes are all exercised.
    Consecutive windows of the held-out text run side by side, ``batch_size`` rows per cache. The
    full-precision reference is computed once and reused for every plan.
    """

    def __init__(self, model: Any, tokenizer: Any, texts: str | None = None, *, windows: int = 2,
                 prefill: int = 384, decode: int = 256, prompts: int = 4, new_tokens: int = 64,
                 passkey_lengths: tuple[int, ...] = (512, 1024), passkey_trials: int = 3, progress: bool = True,
                 batch_size: int = 16):
        from .data import default_texts

        text = default_texts("evaluation") if texts is None else texts
        for name, value, least in (("windows", windows, 1), ("prefill", prefill, 1), ("decode", decode, 1),
                                   ("prompts", prompts, 0), ("new_tokens", new_tokens, 1),
                                   ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= {least}")
        if not text or not text.strip():
            raise ValueError("evaluation text is empty; allowed: non-empty text")
        self.model, self.tokenizer, self.progress = model, tokenizer, progress
        self.prefill, self.decode, self.new_tokens, self.batch_size = prefill, decode, new_tokens, batch_size
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        span = prefill + decode
        need = windows * span + prompts * 64
        if ids.shape[1] < need:
            raise ValueError(f"evaluation text has {ids.shape[1]} tokens; allowed: at least {need} "
                             f"({windows} windows of {span} + {prompts} prompts of 64)")
        self.windows = [ids[:, i * span:(i + 1) * span] for i in range(windows)]
        base = windows * span
        self.prompts = [ids[:, base + i * 64: base + (i + 1) * 64] for i in range(prompts)]
        self.passkeys = [_passkey_prompt(tokenizer, n, trial) for n in passkey_lengths for trial in range(passkey_trials)]
        self._ref: _Reference | None = None

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)

    @torch.no_grad()
    def _run(self, plan: KVPlan | None, desc: str) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[int, float]]:
        model = self.model
        batches = range(0, len(self.windows), self.batch_size)
        # the prefill pass and decode - 1 one-token steps: ``decode`` passes per batch of windows
        bar = self._bar(len(batches) * self.decode + len(self.prompts) + len(self.passkeys), desc)
        logprobs = []
        for i in batches:  # predictions for tokens prefill..end, one decode step each, windows side by side
            ids = torch.cat(self.windows[i:i + self.batch_size])
            logits = stream_logits(model, ids[:, :-1], plan, prefill=self.prefill, chunk_size=1,
                                   on_step=lambda: bar.update(1), first=self.prefill - 1)
            logprobs += list(torch.log_softmax(logits.float(), -1).cpu())
        generations = []
        for prompt in self.prompts:
            out = model.generate(prompt.to(model.device), **with_cache(model, make_cache(model, plan)),
                                 max_new_tokens=self.new_tokens, do_sample=False, min_new_tokens=self.new_tokens)
            generations.append(out[0, prompt.shape[1]:].cpu())
            bar.update(1)
        hits: dict[int, list[bool]] = {}
        for length, ids, answer in self.passkeys:
            out = model.generate(ids.to(model.device), **with_cache(model, make_cache(model, plan)), max_new_tokens=8,
                                 do_sample=False)
            text = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            hits.setdefault(length, []).append(answer in text)
            bar.update(1)
        bar.close()
        return logprobs, generations, {n: sum(h) / len(h) for n, h in hits.items()}

    def reference(self) -> _Reference:
        if self._ref is None:
            self._ref = _Reference(*self._run(None, "full precision"))
        return self._ref

    def __call__(self, plan: KVPlan, label: str | None = None) -> QualityReport:
        """``plan``'s report; ``label`` names it on the progress bar (default: its bits)."""
        ref = self.reference()
        logprobs, generations, passkey = self._run(plan, label or f"{plan.equivalent_bits:.2f}-bit plan")
        targets = [ids[0, self.prefill:] for ids in self.windows]
        win_q = [-lp.gather(1, t.unsqueeze(1)).sum().item() for lp, t in zip(logprobs, targets)]
        win_f = [-lp.gather(1, t.unsqueeze(1)).sum().item() for lp, t in zip(ref.logprobs, targets)]
        nll_q, nll_f = sum(win_q), sum(win_f)
        n = sum(len(t) for t in targets)
        win_kl = [kl_sum(f, q) for f, q in zip(ref.logprobs, logprobs)]
        kl = sum(win_kl) / n
        top1 = sum((f.argmax(-1) == q.argmax(-1)).sum().item() for f, q in zip(ref.logprobs, logprobs)) / n
        same = [torch.equal(a, b) for a, b in zip(ref.generations, generations)]
        prefix = [_common_prefix(a, b) for a, b in zip(ref.generations, generations)]
        layers = {layer.name for layer in plan.layers}
        return QualityReport(
            plan=layers.pop() if len(layers) == 1 else f"mixed {plan.equivalent_bits:.2f}",
            equivalent_bits=plan.equivalent_bits, bytes_per_token=plan.bytes_per_token(self.model.config),
            ppl=math.exp(nll_q / n), full_ppl=math.exp(nll_f / n), kl=max(0.0, kl), top1=top1, tokens_scored=n,
            # no prompts (prompts=0): nothing to compare, which is not agreement
            generation_agreement=sum(same) / len(same) if same else math.nan,
            generation_prefix=sum(prefix) / len(prefix) if prefix else math.nan,
            passkey=passkey, full_passkey=ref.passkey,
            window_nll_delta=[(q - f) / len(t) for q, f, t in zip(win_q, win_f, targets)],
            window_kl=[max(0.0, k) / len(t) for k, t in zip(win_kl, targets)])


def evaluate(model: Any, tokenizer: Any, plan: KVPlan, texts: str | None = None, **kwargs: Any) -> QualityReport:
    """One plan's :class:`QualityReport`; use :class:`Evaluator` to compare several plans."""
    return Evaluator(model, tokenizer, texts, **kwargs)(plan)


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0, 0]) if len(diff) else n


def _passkey_prompt(tokenizer: Any, length: int, trial: int) -> tuple[int, torch.Tensor, str]:
    """A pass key hidden at depth 20-80 % of about ``length`` tokens of filler, asked for at the end."""
    import random

    rng = random.Random(1000 * length + trial)
    key = str(rng.randint(10000, 99999))
    head = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    question = "\nWhat is the pass key? The pass key is"
    filler_tokens = len(tokenizer(PASSKEY_FILLER, add_special_tokens=False).input_ids)
    fixed = len(tokenizer(head + needle + question, add_special_tokens=False).input_ids)
    reps = max(2, (length - fixed) // filler_tokens)
    before = int(reps * rng.uniform(0.2, 0.8))
    text = head + PASSKEY_FILLER * before + needle + PASSKEY_FILLER * (reps - before) + question
    return length, tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids, key
