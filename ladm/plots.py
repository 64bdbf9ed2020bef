"""Headless matplotlib and atomic PNG writes, shared by the probe and the report."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Lay out, write to a temporary file, rename over `path`, close."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    pyplot().close(fig)
    tmp.replace(path)


def draw_delta_r(ax, report: dict, title: str) -> None:
    """ΔR per layer as bars (METHODS.md §1–§2): TAL red, LIL blue, the modulated layers hatched and labelled
    ×m_l, with the bootstrap's 95% interval as error bars when the probe recorded one."""
    from matplotlib.patches import Patch

    delta = report["delta_r"]
    tal, lil = set(report.get("tal", [])), set(report.get("lil", []))
    selected = set(report.get("selected_tal", [])) | set(report.get("selected_lil", []))
    colours = ["tab:red" if i in tal else "tab:blue" if i in lil else "tab:gray" for i in range(len(delta))]
    bootstrap = report.get("bootstrap") or {}
    errors = None
    if "delta_r_low" in bootstrap:
        errors = [[max(d - lo, 0) for d, lo in zip(delta, bootstrap["delta_r_low"], strict=True)],
                  [max(hi - d, 0) for d, hi in zip(delta, bootstrap["delta_r_high"], strict=True)]]
    bars = ax.bar(range(len(delta)), delta, color=colours, edgecolor="black", linewidth=0.4, yerr=errors,
                  error_kw={"elinewidth": 0.6, "capsize": 1.5, "ecolor": "0.3"})
    recurrence = {int(l): share for side in bootstrap.get("recurrence", {}).values() for l, share in side.items()}
    for i, bar in enumerate(bars):
        if i in selected:
            bar.set_hatch("//")
            label = f"×{report['multipliers'][i]:.2g}" + (f"\n{recurrence[i]:.0%}" if i in recurrence else "")
            ax.annotate(label, (i, 0), ha="center", fontsize=6, xytext=(0, -3 if delta[i] >= 0 else 3),
                        textcoords="offset points", va="top" if delta[i] >= 0 else "bottom")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(delta)))
    ax.tick_params(axis="x", labelsize=6)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("ΔR")
    ax.set_title(title, fontsize=8)
    handles = [Patch(color="tab:red", label="TAL (amplified)"), Patch(color="tab:blue", label="LIL (inhibited)"),
               Patch(facecolor="white", edgecolor="black", hatch="//", label="modulated (×m_l, % re-selected)"
                     if recurrence else "modulated (×m_l)")]
    ax.legend(handles=handles, fontsize=6)


def delta_r_title(report: dict) -> str:
    hi, lo = report.get("reference_pair", "p_hi"), report["pair"]
    first, second = (hi, lo) if report.get("probe", {}).get("sign", "hi_minus_lo") == "hi_minus_lo" else (lo, hi)
    n = f", {report['n_sentences']} probe sentences" if report.get("n_sentences") else ""
    interval = ", 95% bootstrap intervals" if (report.get("bootstrap") or {}).get("delta_r_low") else ""
    return f"{report.get('model', '')}: ΔR = R̃({first}) − R̃({second}){n}{interval}".lstrip(": ")


def draw_delta_r_trajectory(ax, details: dict, title: str) -> None:
    """Dynamic ΔR (`method.reprobe_every`): one row per measurement (step 0: the base model, then each
    re-measurement during training), one column per layer, ΔR on a diverging scale centred at 0; the selected
    TAL layers of each row marked T, the selected LIL layers L."""
    from matplotlib.colors import TwoSlopeNorm

    rows = [{"step": 0, **{k: details[k] for k in ("delta_r", "selected_tal", "selected_lil")}}, *details["trajectory"]]
    values = [row["delta_r"] for row in rows]
    bound = max(abs(v) for row in values for v in row) or 1.0
    image = ax.imshow(values, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0, -bound, bound))
    for y, row in enumerate(rows):
        for side, mark in (("selected_tal", "T"), ("selected_lil", "L")):
            for layer in row[side]:
                strong = abs(row["delta_r"][layer]) > 0.6 * bound
                ax.text(layer, y, mark, ha="center", va="center", fontsize=6, color="white" if strong else "black")
    ax.set_xticks(range(len(values[0])))
    ax.set_yticks(range(len(rows)), [str(row["step"]) for row in rows])
    ax.tick_params(labelsize=6)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("optimizer step")
    ax.set_title(title, fontsize=8)
    ax.figure.colorbar(image, ax=ax, label="ΔR")
