"""The tune report: ``report.md`` and a self-contained ``report.html`` with embedded PNG plots."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from .spec import KVPlan, ModelDims

CONTEXTS = (4096, 32768, 131072)
REFERENCE = "uniform KV4"  # the plan every KL ratio is paired with: KIVI-4 as published


def _report(row: dict[str, Any]):
    from .evaluation import QualityReport

    return QualityReport(**{k: v for k, v in row.items() if k in QualityReport.__dataclass_fields__})


def kl_ratio(row: dict[str, Any], ref: dict[str, Any] | None) -> tuple[float, float, float] | None:
    """``row``'s KL over ``ref``'s, paired window by window, with its +-2 s.e. interval (None: too few windows)."""
    if ref is None or len(row.get("window_kl", [])) < 2 or len(row["window_kl"]) != len(ref.get("window_kl", [])):
        return None
    return _report(row).kl_ratio_interval(_report(ref))


def ppl_interval(row: dict[str, Any]) -> tuple[float, float] | None:
    """PPL change against full precision, +-2 s.e. over windows (None: one window)."""
    return _report(row).ppl_delta_interval() if len(row.get("window_nll_delta", [])) >= 2 else None


def recommendation(quality: list[dict[str, Any]], plans_by_name: dict[str, str]) -> str:
    """One paragraph: which plan to use, what it saves and what it costs, with intervals.

    The cheapest searched plan whose KL is within noise of uniform KV4's (paired ratio at most 1.05,
    or an interval that reaches 1) is KV4 quality for less memory; failing that, the searched plan
    with the lowest KL."""
    ref = next((r for r in quality if r["name"] == REFERENCE), None)
    searched = sorted((r for r in quality if r["name"] in plans_by_name), key=lambda r: r["equivalent_bits"])
    if not searched:
        return "No searched plan was evaluated."
    ratios = {r["name"]: kl_ratio(r, ref) for r in searched}
    good = [r for r in searched if ratios[r["name"]] and (ratios[r["name"]][0] <= 1.05 or ratios[r["name"]][1] <= 1.0)]
    pick = good[0] if good else min(searched, key=lambda r: r["kl"])
    ratio, ci = ratios[pick["name"]], ppl_interval(pick)
    text = f"Use {plans_by_name[pick['name']]} ({pick['equivalent_bits']:.2f} bits, {pick['bytes_per_token']:.0f} bytes per token"
    if ref is not None:
        text += f", {100 * (1 - pick['bytes_per_token'] / ref['bytes_per_token']):.0f} % less than uniform KV4"
    text += ")."
    if ratio:
        text += (f" On held-out text its KL against full precision is {ratio[0]:.2f}x uniform KV4's "
                 f"[{ratio[1]:.2f}, {ratio[2]:.2f}]")
        text += (" - within noise of uniform KV4's quality, for less memory." if pick in good else
                 " - no searched plan matched KV4 quality here; this is the closest.")
    if ci:
        text += (f" Perplexity changes by {100 * (pick['ppl'] / pick['full_ppl'] - 1):+.2f} % "
                 f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}] against a full-precision cache.")
    others = [r for r in searched if r is not pick and ratios[r["name"]]]
    if others:
        text += " Other budgets: " + "; ".join(
            f"{plans_by_name[r['name']]} at {ratios[r['name']][0]:.2f}x KV4's KL "
            f"[{ratios[r['name']][1]:.2f}, {ratios[r['name']][2]:.2f}], {r['bytes_per_token']:.0f} bytes per token"
            for r in others) + "."
    return text + " Intervals: +-2 standard errors over held-out windows."


def quality_lines(quality: list[dict[str, Any]]) -> list[str]:
    """The terminal summary: one line per plan, KL ratios paired with uniform KV4."""
    ref = next((r for r in quality if r["name"] == REFERENCE), None)
    lines = [f"{'plan':<20} {'bits':>5} {'bytes/tok':>9} {'PPL vs full':>12} {'KL':>8} {'KL / KV4 [+-2 s.e.]':>22}"]
    for r in quality:
        ratio = kl_ratio(r, ref)
        rtxt = "" if ratio is None or r is ref else f"{ratio[0]:.2f} [{ratio[1]:.2f}, {ratio[2]:.2f}]"
        lines.append(f"{r['name']:<20} {r['equivalent_bits']:>5.2f} {r['bytes_per_token']:>9.0f} "
                     f"{100 * (r['ppl'] / r['full_ppl'] - 1):>+11.2f}% {r['kl']:>8.4f} {rtxt:>22}")
    return lines


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _heatmap(table, mode: str) -> bytes:
    import matplotlib.pyplot as plt
    import numpy as np

    blocks = [np.log10(np.maximum(np.asarray(b, dtype=float), 1e-6))
              for b in (table.key_error[mode], table.value_error[mode])]
    lo, hi = min(b.min() for b in blocks), max(b.max() for b in blocks)  # one scale for both panels
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.22 * table.num_layers + 1.6), sharey=True)
    for ax, name, data in zip(axes, ("keys quantized", "values quantized"), blocks):
        im = ax.imshow(data, aspect="auto", cmap="magma_r", vmin=lo, vmax=hi)
        ax.set_xticks(range(len(table.bits)), [f"{b}-bit" for b in table.bits])
        ax.set_xlabel("bits (the other tensor at 16)")
        ax.set_title(name)
    axes[0].set_ylabel("layer")
    bar = fig.colorbar(im, ax=axes, fraction=0.04)
    bar.set_label("log10 relative attention-output error")
    fig.suptitle(f"Layer sensitivity ({mode}): darker = more sensitive")
    return _png(fig)


def _front(proxy, fronts: dict[float, Any], quality: list[dict[str, Any]]) -> bytes:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [p.equivalent_bits for p in proxy.points]
    ax1.plot(xs, [p.proxy_error for p in proxy.points], "o-", ms=3, color="tab:blue", label="solver front (sum of one-layer costs)")
    for b, front in fronts.items():
        pts = [p for p in front.points if p.quality is not None]
        if pts:
            ax1.scatter([p.equivalent_bits for p in pts], [p.quality for p in pts], marker="s", s=22,
                        label=f"NSGA-II measured, budget {b:g}")
    ax1.set_xlabel("equivalent bits (mean of K and V bits)")
    ax1.set_ylabel("KL vs full precision")
    ax1.set_yscale("log")
    ax1.set_title("Search: proxy front and measured trials")
    ax1.legend(fontsize=7)
    for r in quality:
        uniform = r["name"].startswith("uniform")
        y = max(r["kl"], 1e-6)
        ax2.scatter(r["equivalent_bits"], y, marker="o" if uniform else "*", s=40 if uniform else 160,
                    color="tab:gray" if uniform else "tab:red", zorder=3)
        # uniform labels to the left and below, searched ones to the right and above: equal bits do not collide
        ax2.annotate(r["name"].replace("uniform ", "").replace("searched <= ", "searched "), (r["equivalent_bits"], y),
                     fontsize=7, xytext=(-6, -10) if uniform else (6, 4), textcoords="offset points",
                     ha="right" if uniform else "left")
    ax2.set_xlabel("equivalent bits")
    ax2.set_ylabel("held-out KL vs full precision")
    ax2.set_yscale("log")
    ax2.set_title("Held-out quality: searched (red stars) vs uniform (grey)")
    fig.tight_layout()  # long log-scale tick labels otherwise run into the next panel's axis label
    return _png(fig)


def _allocation(plans: dict[str, KVPlan]) -> bytes:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(plans), 1, figsize=(10, 2.1 * len(plans)), squeeze=False)
    for ax, (name, plan) in zip(axes[:, 0], plans.items()):
        x = np.arange(plan.num_layers)
        ax.bar(x - 0.2, [p[0] for p in plan.pairs], 0.4, label="K bits", color="tab:blue")
        ax.bar(x + 0.2, [p[1] for p in plan.pairs], 0.4, label="V bits", color="tab:orange")
        ax.set_yticks(sorted({b for p in plan.pairs for b in p[:2]}))
        ax.set_ylabel("bits")
        ax.set_title(f"{name}: {plan.equivalent_bits:.2f} equivalent bits")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    return _png(fig)


def _memory_rows(plans: dict[str, KVPlan], config: Any, dtype_bytes: int) -> list[list[str]]:
    dims = ModelDims.from_config(config)
    full = KVPlan.uniform(dims.num_layers, 16, 16).bytes_per_token(config, dtype_bytes)
    rows = [["full precision", "16.00", f"{full:.0f}", *[f"{full * n / 2**20:.0f} MiB" for n in CONTEXTS], "-"]]
    for name, plan in plans.items():
        bpt = plan.bytes_per_token(config, dtype_bytes)
        rows.append([name, f"{plan.equivalent_bits:.2f}", f"{bpt:.0f}",
                     *[f"{plan.expected_nbytes(config, n, dtype_bytes=dtype_bytes) / 2**20:.0f} MiB" for n in CONTEXTS],
                     f"{100 * (1 - bpt / full):.1f} %"])
    return rows


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows])


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def write_report(out: Path, table, mode: str, proxy, fronts: dict[float, Any], quality: list[dict[str, Any]],
                 config: Any, *, model_id: str | None = None, dtype_bytes: int = 2) -> list[Path]:
    """Write the plots (PNG files), ``report.md`` and ``report.html``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    plans = {f"searched <= {b:g}": KVPlan.load(out / f"plan-{b:g}.json") for b in fronts}
    images = {"sensitivity.png": _heatmap(table, mode), "front.png": _front(proxy, fronts, quality),
              "allocation.png": _allocation(plans)}
    for name, data in images.items():
        (out / name).write_bytes(data)
    ref = next((r for r in quality if r["name"] == REFERENCE), None)
    q_head = ["plan", "eq. bits", "bytes/token", "PPL", "vs full [+-2 s.e.]", "KL", "KL / uniform KV4 [+-2 s.e.]",
              "top-1", "gen. identical", "gen. prefix"]
    full_ppl = quality[0]["full_ppl"] if quality else float("nan")
    q_rows = [["full precision", "16.00", "", f"{full_ppl:.3f}", "", "0", "", "1.000", "", ""]]
    for r in quality:
        ci, ratio = ppl_interval(r), kl_ratio(r, ref)
        q_rows.append([r["name"], f"{r['equivalent_bits']:.2f}", f"{r['bytes_per_token']:.0f}", f"{r['ppl']:.3f}",
                       f"{100 * (r['ppl'] / r['full_ppl'] - 1):+.2f} %"
                       + (f" [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if ci else ""),
                       f"{r['kl']:.4f}", "1 (reference)" if r is ref else
                       (f"{ratio[0]:.2f} [{ratio[1]:.2f}, {ratio[2]:.2f}]" if ratio else ""),
                       f"{r['top1']:.3f}", f"{r['generation_agreement']:.2f}", f"{r['generation_prefix']:.1f}"])
    windows = len(quality[0].get("window_kl", [])) if quality else 0
    tokens = quality[0]["tokens_scored"] if quality else 0
    protocol = (f"Held-out text (never used for calibration): {windows} windows, {tokens} scored tokens in all; each "
                "window is prefilled, then decoded one teacher-forced token per step through the real cache. PPL and "
                "KL are against the same model with a full-precision cache on the same tokens. Intervals are +-2 "
                "standard errors over windows; KL / uniform KV4 pairs the two plans window by window (geometric "
                "mean of per-window ratios). Uniform plans are KIVI as published (plain storage, no sink tokens). "
                "top-1: share of positions whose most likely token matches full precision. gen. identical: share "
                "of greedy continuations (32 tokens) identical to full precision's; gen. prefix: mean count of "
                "leading tokens that match.")
    advice = recommendation(quality, plans_by_name={f"searched <= {b:g}": f"plan-{b:g}.json" for b in fronts})
    m_head = ["plan", "eq. bits", "bytes/token", *[f"KV at {n // 1024}k tokens" for n in CONTEXTS], "saving"]
    uniform = {r["name"]: KVPlan.from_pairs([tuple(p) for p in r["pairs"]], mode) for r in quality
               if r["name"].startswith("uniform") and "pairs" in r}
    m_rows = _memory_rows({**plans, **uniform}, config, dtype_bytes)
    title = f"kvtuner report: {model_id or 'model'} ({mode})"
    rounding = any(p.key_rounding is not None for p in plans.values())
    intro = (f"Profiled on {table.num_tokens} calibration tokens; one-layer KL costs drive the exact budget solver; "
             f"NSGA-II measured plans through the real cache; quality is measured on held-out text."
             + (" The searched plans' keys take query-aware codes (rounded against the queries' second moments "
                "measured on the calibration text; same bytes as nearest rounding)." if rounding else ""))
    mem_note = (f"Cache memory per sequence with a {8 * dtype_bytes}-bit model dtype (codes + scales/zeros + "
                "residual window, as MixedPrecisionCache.nbytes() counts it); bytes/token is the steady-state cost.")
    md = [f"# {title}", "", "## Recommendation", "", advice, "", intro, "", "## Quality against full precision", "",
          protocol, "", _md_table(q_head, q_rows), "",
          "## Memory", "", mem_note, "", _md_table(m_head, m_rows), "", "## Plots", "",
          "![sensitivity](sensitivity.png)", "", "![front](front.png)", "", "![allocation](allocation.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    imgs = "".join(f'<figure><img alt="{n}" src="data:image/png;base64,{base64.b64encode(d).decode()}"></figure>'
                   for n, d in (("front", images["front.png"]), ("sensitivity", images["sensitivity.png"]),
                                ("allocation", images["allocation.png"])))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0;font-size:14px}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}figure{{margin:1em 0}}
.advice{{background:#eef6ee;border-left:4px solid #3a3;padding:.6em 1em}}</style></head><body>
<h1>{html.escape(title)}</h1><h2>Recommendation</h2><p class="advice">{html.escape(advice)}</p>
<p>{html.escape(intro)}</p>
<h2>Quality against full precision</h2><p>{html.escape(protocol)}</p>{_html_table(q_head, q_rows)}
<h2>Memory</h2><p>{html.escape(mem_note)}</p>{_html_table(m_head, m_rows)}
<h2>Plots</h2>{imgs}</body></html>"""
    (out / "report.html").write_text(page)
    return [out / "report.md", out / "report.html", *(out / n for n in images)]
