"""The run's report: every model's scores side by side (Markdown + JSON) and plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stacking.submission import CLIP


def choose_model(cv: dict[str, dict], requested: str | None = None,
                 clip_mode: str = "auto") -> tuple[str, bool, str]:
    """The submission model, whether to clip it, and why.

    Model: the one asked for, else the lowest CV log loss. Clipping ("auto"): kept when it lowers
    that model's CV log loss; "on"/"off" force it.
    """
    if requested and requested not in cv:
        raise KeyError(f"Unknown model '{requested}' for --submit-with; available: {', '.join(cv)}")

    def loss(m):
        key = {"on": "log_loss_clipped", "off": "log_loss"}.get(clip_mode)
        return cv[m][key] if key else min(cv[m]["log_loss"], cv[m]["log_loss_clipped"])

    best = requested or min(cv, key=loss)
    clipped = {"on": True, "off": False}.get(clip_mode, cv[best]["log_loss_clipped"] < cv[best]["log_loss"])
    why = "chosen with --submit-with" if requested else \
        f"lowest CV log loss ({loss(best):.4f}) of {len(cv)} models on the same folds"
    how = {"on": "clipped (--clip on)", "off": "not clipped (--clip off)"}.get(
        clip_mode, "clipped, which lowers its CV log loss" if clipped
        else "not clipped, since clipping raises its CV log loss")
    return best, clipped, f"{why}; {how}"


def markdown_table(cv: dict[str, dict], holdout: dict[str, dict] | None, chosen: str) -> str:
    head = "| model | CV log loss | CV log loss (clipped) | CV accuracy |"
    rule = "| --- | --- | --- | --- |"
    if holdout:
        head += " held-out log loss | held-out (clipped) | held-out accuracy |"
        rule += " --- | --- | --- |"
    lines = [head, rule]
    for name, s in cv.items():
        mark = " **(submitted)**" if name == chosen else ""
        row = f"| {name}{mark} | {s['log_loss']:.4f} | {s['log_loss_clipped']:.4f} | {s['accuracy']:.4f} |"
        if holdout:
            h = holdout[name]
            row += f" {h['log_loss']:.4f} | {h['log_loss_clipped']:.4f} | {h['accuracy']:.4f} |"
        lines.append(row)
    return "\n".join(lines)


def write_report(out: Path, info: dict, cv: dict, holdout: dict | None, chosen: str, clipped: bool,
                 reason: str, oof: dict[str, np.ndarray], y: np.ndarray) -> str:
    """Write report.md, report.json and the plots; returns the Markdown table."""
    table = markdown_table(cv, holdout, chosen)
    plots = make_plots(out, cv, holdout, chosen, oof, y)
    (out / "report.json").write_text(json.dumps(
        {**info, "cv": cv, "holdout": holdout, "submit_with": chosen, "reason": reason,
         "clip": list(CLIP) if clipped else None, "plots": plots}, indent=2, default=str))
    lines = [f"# gapstack run: {info['out']}", "",
             f"Data: {', '.join(info['data'])}; {info['n_train']} training photos"
             + (f" ({info['n_holdout']} more held out)" if info.get("n_holdout") else "")
             + f", {info['n_test']} test photos; {info['folds']} folds (seed {info['seed']}).",
             f"Backbones: {', '.join(info['backbones'])}; heads: {', '.join(info['heads'])}; "
             f"test predictions: {info['test_mode']}.", "",
             table, "",
             f"Submission: **{chosen}**: {reason}"
             + (f" (bounds {list(CLIP)})." if clipped else "."), ""]
    if info.get("exclusion"):
        ex = info["exclusion"]
        lines += [f"## Without the {ex['n_excluded']} photos excluded by {ex['source']}", "",
                  "Same folds; both columns scored on the kept photos only.", "",
                  "| model | CV log loss, trained with them | CV log loss, trained without | change |",
                  "| --- | --- | --- | --- |"]
        for name, s in cv.items():
            before = ex["cv_with_excluded_rows"][name]["log_loss"]
            lines.append(f"| {name} | {before:.4f} | {s['log_loss']:.4f} | {s['log_loss'] - before:+.4f} |")
        lines.append("")
    if info.get("unreadable"):
        lines += [f"Unreadable photos: {len(info['unreadable'])} (test rows among them get 0.5).", ""]
    lines += [f"![{title}]({file})" for title, file in plots.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return table


def make_plots(out: Path, cv: dict, holdout: dict | None, chosen: str, oof: dict[str, np.ndarray],
               y: np.ndarray) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    files = {}
    names = list(cv)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
    pos = np.arange(len(names))
    ax.barh(pos, [cv[n]["log_loss_clipped"] for n in names], height=0.4,
            color=["tab:orange" if n == chosen else "tab:blue" for n in names], label="CV (clipped)")
    if holdout:
        ax.barh(pos + 0.4, [holdout[n]["log_loss_clipped"] for n in names], height=0.4,
                color="lightgray", label="held out (clipped)")
    ax.set_yticks(pos + (0.2 if holdout else 0), names)
    ax.invert_yaxis()
    ax.set_xlabel("log loss (lower is better)")
    ax.set_title("Every model on the same folds")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "logloss.png", dpi=110)
    plt.close(fig)
    files["Log loss per model"] = "logloss.png"

    best_single = min((n for n in names if "/" in n), key=lambda n: cv[n]["log_loss_clipped"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in dict.fromkeys([chosen, best_single]):
        frac, mean = calibration_curve(y, oof[name], n_bins=10, strategy="uniform")
        axes[0].plot(mean, frac, "o-", label=name)
    axes[0].plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    axes[0].set_xlabel("predicted P(dog) (OOF)")
    axes[0].set_ylabel("fraction of dogs")
    axes[0].set_title("Calibration")
    axes[0].legend()
    bins = np.linspace(0, 1, 41)
    axes[1].hist(oof[chosen][y == 0], bins=bins, alpha=0.6, label="cats")
    axes[1].hist(oof[chosen][y == 1], bins=bins, alpha=0.6, label="dogs")
    axes[1].set_yscale("log")
    axes[1].set_xlabel(f"OOF P(dog) of {chosen}")
    axes[1].set_title("Where the predictions fall")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=110)
    plt.close(fig)
    files["Calibration and OOF distribution"] = "calibration.png"
    return files
