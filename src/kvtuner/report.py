"""The tune report: ``report.md`` and a self-contained ``report.html`` with embedded PNG plots."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from .spec import KVPlan, ModelDims

CONTEXTS = (4096, 32768, 131072)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _heatmap(table, mode: str) -> bytes:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(9, 0.22 * table.num_layers + 1.6), sharey=True)
    for ax, (name, block) in zip(axes, (("key only", table.key_error[mode]), ("value only", table.value_error[mode]))):
        data = np.log10(np.maximum(np.asarray(block, dtype=float), 1e-6))
        im = ax.imshow(data, aspect="auto", cmap="magma_r")
        ax.set_xticks(range(len(table.bits)), [f"{b}-bit" for b in table.bits])
        ax.set_xlabel("bits of the quantized tensor (other at 16)")
        ax.set_title(f"{name}: log10 relative attention error")
        fig.colorbar(im, ax=ax, fraction=0.05)
    axes[0].set_ylabel("layer")
    fig.suptitle(f"Layer sensitivity ({mode})")
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
        ax2.scatter(r["equivalent_bits"], max(r["kl"], 1e-6), marker="o" if uniform else "*", s=40 if uniform else 160,
                    color="tab:gray" if uniform else "tab:red", zorder=3)
        ax2.annotate(r["name"].replace("uniform ", "").replace("searched ", ""), (r["equivalent_bits"], max(r["kl"], 1e-6)),
                     fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax2.set_xlabel("equivalent bits")
    ax2.set_ylabel("held-out KL vs full precision")
    ax2.set_yscale("log")
    ax2.set_title("Held-out quality: searched (red stars) vs uniform (grey)")
    return _png(fig)


def _allocation(plans: dict[str, KVPlan]) -> bytes:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(plans), 1, figsize=(10, 2.1 * len(plans)), squeeze=False)
    for ax, (name, plan) in zip(axes[:, 0], plans.items()):
        x = np.arange(plan.num_layers)
        ax.bar(x - 0.2, [p[0] for p in plan.pairs], 0.4, label="K bits", color="tab:blue")
        ax.bar(x + 0.2, [p[1] for p in plan.pairs], 0.4, label="V bits", color="tab:orange")
        ax.set_yticks([2, 4, 8])
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
    q_head = ["plan", "eq. bits", "bytes/token", "PPL", "vs full", "KL", "top-1", "gen. identical", "gen. prefix"]
    full_ppl = quality[0]["full_ppl"] if quality else float("nan")
    q_rows = [["full precision", "16.00", "", f"{full_ppl:.3f}", "", "0", "1.000", "", ""]]
    q_rows += [[r["name"], f"{r['equivalent_bits']:.2f}", f"{r['bytes_per_token']:.0f}", f"{r['ppl']:.3f}",
                f"{100 * (r['ppl'] / r['full_ppl'] - 1):+.2f} %", f"{r['kl']:.4f}", f"{r['top1']:.3f}",
                f"{r['generation_agreement']:.2f}", f"{r['generation_prefix']:.1f}"] for r in quality]
    m_head = ["plan", "eq. bits", "bytes/token", *[f"KV at {n // 1024}k tokens" for n in CONTEXTS], "saving"]
    uniform = {r["name"]: KVPlan.from_pairs([tuple(p) for p in r["pairs"]], mode) for r in quality
               if r["name"].startswith("uniform") and "pairs" in r}
    m_rows = _memory_rows({**plans, **uniform}, config, dtype_bytes)
    title = f"kvtuner report: {model_id or 'model'} ({mode})"
    intro = (f"Profiled on {table.num_tokens} calibration tokens; one-layer KL costs drive the exact budget solver; "
             f"NSGA-II measured plans through the real cache; quality is measured on held-out text.")
    mem_note = (f"Cache memory per sequence with a {8 * dtype_bytes}-bit model dtype (codes + scales/zeros + "
                "residual window, as MixedPrecisionCache.nbytes() counts it); bytes/token is the steady-state cost.")
    md = [f"# {title}", "", intro, "", "## Quality against full precision", "", _md_table(q_head, q_rows), "",
          "## Memory", "", mem_note, "", _md_table(m_head, m_rows), "", "## Plots", "",
          "![sensitivity](sensitivity.png)", "", "![front](front.png)", "", "![allocation](allocation.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    imgs = "".join(f'<figure><img alt="{n}" src="data:image/png;base64,{base64.b64encode(d).decode()}"></figure>'
                   for n, d in (("front", images["front.png"]), ("sensitivity", images["sensitivity.png"]),
                                ("allocation", images["allocation.png"])))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0;font-size:14px}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}figure{{margin:1em 0}}</style></head><body>
<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>
<h2>Quality against full precision</h2>{_html_table(q_head, q_rows)}
<h2>Memory</h2><p>{html.escape(mem_note)}</p>{_html_table(m_head, m_rows)}
<h2>Plots</h2>{imgs}</body></html>"""
    (out / "report.html").write_text(page)
    return [out / "report.md", out / "report.html", *(out / n for n in images)]
