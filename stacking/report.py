"""The run's report: every model's scores side by side (Markdown + JSON) and plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stacking.submission import CLIP, clip_rule, per_class_recall, submit_command


def choose_model(cv: dict[str, dict], requested: str | None = None,
                 clip_mode: str = "auto") -> tuple[str, bool, str]:
    """The submission model, whether to clip it, and why.

    Model: the one asked for, else the lowest CV log loss. Clipping ("auto"): kept when it lowers
    that model's CV log loss; "on"/"off" force it.
    """
    if requested and requested not in cv:
        raise KeyError(f"Unknown model '{requested}' for --submit-with; available: {', '.join(cv)}")

    def loss(m):
        return submitted_loss(cv[m], clip_mode)

    best = requested or min(cv, key=loss)
    clipped = clip_rule(cv[best], clip_mode)
    why = "chosen with --submit-with" if requested else \
        f"lowest CV log loss ({loss(best):.4f}) of {len(cv)} models on the same folds"
    how = {"on": "clipped (--clip on)", "off": "not clipped (--clip off)"}.get(
        clip_mode, "clipped, which lowers its CV log loss" if clipped
        else "not clipped, since clipping raises its CV log loss")
    return best, clipped, f"{why}; {how}"


def submitted_loss(score: dict, clip_mode: str = "auto") -> float:
    """A model's CV log loss as its submission file is made (clipped or not by ``clip_rule``)."""
    return score["log_loss_clipped"] if clip_rule(score, clip_mode) else score["log_loss"]


def _lb(value) -> str:
    return "" if value is None or value != value else f"{value:.5f}"


def score_sets(holdout: dict | None, test: dict | None) -> dict[str, dict]:
    """The scores beside CV, by their column title: the held-out photos', a labelled test split's."""
    return {title: s for title, s in (("held-out", holdout), ("labelled test", test)) if s}


def markdown_table(cv: dict[str, dict], holdout: dict[str, dict] | None, chosen: str,
                   leaderboard: dict[str, dict] | None = None, test: dict[str, dict] | None = None) -> str:
    """Every model's CV (and held-out, labelled test, recorded leaderboard) scores, one row each."""
    head = "| model | CV log loss | CV log loss (clipped) | CV accuracy |"
    rule = "| --- | --- | --- | --- |"
    checks = score_sets(holdout, test)
    for title in checks:
        head += f" {title} log loss | {title} (clipped) | {title} accuracy |"
        rule += " --- | --- | --- |"
    if leaderboard:
        head += " public LB | private LB |"
        rule += " --- | --- |"
    lines = [head, rule]
    for name, s in cv.items():
        mark = " **(submitted)**" if name == chosen else ""
        row = f"| {name}{mark} | {s['log_loss']:.4f} | {s['log_loss_clipped']:.4f} | {s['accuracy']:.4f} |"
        for h in (c[name] for c in checks.values()):
            row += f" {h['log_loss']:.4f} | {h['log_loss_clipped']:.4f} | {h['accuracy']:.4f} |"
        if leaderboard:
            lb = leaderboard.get(name, {})
            public = _lb(lb.get("public")) or (lb.get("status") or "").lower()  # pending, error
            row += f" {public} | {_lb(lb.get('private'))} |"
        lines.append(row)
    return "\n".join(lines)


def submissions_section(submissions: dict[str, dict], run: Path) -> list[str]:
    """The per-model Kaggle files with their CV log loss as submitted, and how to submit each
    (paths as the run was given, so the lines work from where it was started)."""
    lines = ["## A Kaggle submission for every model", "",
             "Each file is `id,label` for every test photo, clipped where clipping lowers that "
             "model's CV log loss. Submit them and record their scores in one command: "
             "`python -m stacking.leaderboard RUN --submit MODEL[,MODEL...]`; or submit from the "
             "notebook's Output tab or with the Kaggle CLI, then record the scores: "
             "`python -m stacking.leaderboard RUN --record MODEL=PUBLIC[,PRIVATE]`.", "",
             "| model | file | clipped | CV log loss as submitted |", "| --- | --- | --- | --- |"]
    for name, sub in submissions.items():
        lines.append(f"| {name} | `{sub['file']}` | {'yes' if sub['clipped'] else 'no'} | {sub['cv_log_loss']:.4f} |")
    lines += ["", "```bash"]
    lines += [submit_command(run / sub["file"], f"gapstack {run.name} {name} (CV {sub['cv_log_loss']:.4f})")
              for name, sub in submissions.items()]
    return lines + ["```", ""]


def exclusion_section(ex: dict) -> list[str]:
    """With and without the excluded photos, on all training rows (the excluded ones predicted as
    the test set is) and on the kept rows only, and what that says."""
    models = ex["models"]
    lines = [f"## Without the {ex['n_excluded']} photos excluded by {ex['source']}", "",
             "Same folds. **All rows**: every training photo scored, the excluded ones predicted by "
             "the fold models that never trained on them, as the test set is predicted (the test set "
             "holds such photos too). **Kept rows**: only the photos kept, which flatters leaving "
             "photos out.", "",
             "| model | all rows: with | all rows: without | change | kept rows: with | kept rows: without | change |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in models.items():
        a, k = m["all_rows"], m["kept_rows"]
        da = a["without"]["log_loss"] - a["with"]["log_loss"]
        dk = k["without"]["log_loss"] - k["with"]["log_loss"]
        lines.append(f"| {name} | {a['with']['log_loss']:.4f} | {a['without']['log_loss']:.4f} | {da:+.4f} | "
                     f"{k['with']['log_loss']:.4f} | {k['without']['log_loss']:.4f} | {dk:+.4f} |")
    worse = [n for n, m in models.items() if m["all_rows"]["without"]["log_loss"] > m["all_rows"]["with"]["log_loss"]]
    kept_better = [n for n, m in models.items()
                   if m["kept_rows"]["without"]["log_loss"] < m["kept_rows"]["with"]["log_loss"]]
    verdict = (f"Leaving them out **hurts** {len(worse)} of {len(models)} models on all rows"
               if worse else f"Leaving them out helps all {len(models)} models on all rows")
    if worse and kept_better:
        verdict += f", while the kept rows alone say it helps {len(kept_better)}"
    return lines + ["", verdict + ".", ""]


def effect_section(effect: dict, title: str, leave_out: str) -> list[str]:
    """What some level-1 models add: every stacker with them and refitted without them, same folds."""
    lines = [f"## {title} ({', '.join(effect['models'])})", "",
             f"Each stacker as fitted, and refitted on the same folds without these columns "
             f"({leave_out}).", "",
             "| stacker | CV log loss with them | without | change |", "| --- | --- | --- | --- |"]
    for name, s in effect["stackers"].items():
        a, b = s["with"]["log_loss"], s["without"]["log_loss"]
        lines.append(f"| {name} | {a:.4f} | {b:.4f} | {a - b:+.4f} |")
    return lines + [""]


def recall_section(classes: list[str], oof: dict[str, np.ndarray], y: np.ndarray, chosen: str,
                   cv: dict[str, dict]) -> list[str]:
    """Per-class recall (OOF) of the chosen model and the best single one: where the errors are."""
    best_single = min((n for n in oof if "/" in n), key=lambda n: cv[n]["log_loss"], default=chosen)
    shown = list(dict.fromkeys([chosen, best_single]))
    recall = {n: per_class_recall(y, oof[n], classes) for n in shown}
    lines = ["## Per-class recall (out of fold)", "",
             "| class | photos | " + " | ".join(shown) + " |", "| --- | --- |" + " --- |" * len(shown)]
    for k, c in enumerate(classes):
        lines.append(f"| {c} | {int((y == k).sum())} | " + " | ".join(f"{recall[n][c]:.3f}" for n in shown) + " |")
    return lines + [""]


def write_report(out: Path, info: dict, cv: dict, holdout: dict | None, chosen: str, clipped: bool,
                 reason: str, oof: dict[str, np.ndarray], y: np.ndarray,
                 submissions: dict[str, dict] | None = None,
                 leaderboard: dict[str, dict] | None = None, test: dict | None = None) -> str:
    """Write report.md, report.json and the plots; returns the Markdown table.

    ``submissions``: the per-model Kaggle files (``write_model_submissions``); ``leaderboard``:
    recorded scores per model ({"public", "private"}, ``stacking.leaderboard``); ``test``: every
    model's scores on a labelled test split."""
    table = markdown_table(cv, holdout, chosen, leaderboard, test)
    classes = info.get("classes")
    plots = make_plots(out, cv, score_sets(holdout, test), chosen, oof, y, leaderboard, submissions, classes)
    (out / "report.json").write_text(json.dumps(
        {**info, "cv": cv, "holdout": holdout, "test": test, "submit_with": chosen, "reason": reason,
         "clip": list(CLIP) if clipped else None, "plots": plots, "submissions": submissions,
         "leaderboard": leaderboard}, indent=2, default=str))
    lines = [f"# gapstack run: {info['out']}", "",
             f"Data: {', '.join(info['data'])}; {info['n_train']} training photos"
             + (f" ({info['n_holdout']} more held out)" if info.get("n_holdout") else "")
             + f", {info['n_test']} test photos; {info['folds']} folds (seed {info['seed']}).",
             *([f"Task: {info['task']}."] if info.get("task") else []),
             f"Backbones: {', '.join(info['backbones'])}; heads: {', '.join(info['heads'])}; "
             f"test predictions: {info['test_mode']}.", "",
             table, "",
             (f"Submission: **{chosen}**: {reason}" if info.get("n_test") != 0 else
              f"No test photos, so no submission; the model kept for new photos is **{chosen}**: {reason}")
             + (f" (bounds {list(CLIP)})." if clipped else "."), ""]
    if classes and len(classes) > 2:
        lines += recall_section(classes, oof, y, chosen, cv)
    if submissions:
        lines += submissions_section(submissions, Path(info["out"]))
    if info.get("finetune_effect"):
        lines += effect_section(info["finetune_effect"], "What fine-tuning adds",
                                "a run without `--finetune` on the same folds gives the same figures")
    if info.get("imagenet_prior"):
        lines += effect_section(info["imagenet_prior"], "What the ImageNet prior adds",
                                "`--no-imagenet` leaves them out of the run")
    if info.get("exclusion"):
        lines += exclusion_section(info["exclusion"])
    if info.get("unreadable"):
        lines += [f"Unreadable photos: {len(info['unreadable'])} (test rows among them get 0.5).", ""]
    lines += [f"![{title}]({file})" for title, file in plots.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return table


def make_plots(out: Path, cv: dict, checks: dict[str, dict], chosen: str, oof: dict[str, np.ndarray],
               y: np.ndarray, leaderboard: dict[str, dict] | None = None,
               submissions: dict[str, dict] | None = None, classes: list[str] | None = None) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    files = {}
    names = list(cv)
    # What the submission is chosen by: unclipped and clipped CV side by side (and held out, and
    # a labelled test split).
    bars = [("CV", "log_loss", cv, "tab:blue"), ("CV, clipped", "log_loss_clipped", cv, "tab:cyan")]
    for (title, scores), dark, light in zip(checks.items(), ("darkgray", "tab:olive"), ("lightgray", "khaki")):
        bars += [(title, "log_loss", scores, dark), (f"{title}, clipped", "log_loss_clipped", scores, light)]
    height = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(8.5, (0.25 + 0.16 * len(bars)) * len(names) + 1.5))
    pos = np.arange(len(names))
    for k, (label, key, table, colour) in enumerate(bars):
        values = [table[n][key] for n in names]
        ax.barh(pos + k * height, values, height=height, color=colour, label=label)
    ax.set_yticks(pos + height * (len(bars) - 1) / 2,
                  [f"{n}  (submitted)" if n == chosen else n for n in names])
    for tick in ax.get_yticklabels():
        if tick.get_text().endswith("(submitted)"):
            tick.set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlabel("log loss (lower is better)")
    ax.set_title("Every model on the same folds: unclipped and clipped")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "logloss.png", dpi=110)
    plt.close(fig)
    files["Log loss per model"] = "logloss.png"

    recorded = {n: lb["public"] for n, lb in (leaderboard or {}).items() if lb.get("public") is not None}
    if recorded:
        fig, ax = plt.subplots(figsize=(6.5, 5))
        xs = [submissions[n]["cv_log_loss"] if submissions else submitted_loss(cv[n]) for n in recorded]
        ys = list(recorded.values())
        ax.scatter(xs, ys, color=["tab:orange" if n == chosen else "tab:blue" for n in recorded])
        for n, x, v in zip(recorded, xs, ys):
            ax.annotate(n, (x, v), textcoords="offset points", xytext=(4, 4), fontsize="small")
        lo, hi = min(xs + ys), max(xs + ys)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="leaderboard = CV")
        ax.set_xlabel("CV log loss, as the file was submitted (clipped or not)")
        ax.set_ylabel("public leaderboard log loss")
        ax.set_title("CV against the leaderboard")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "cv_vs_leaderboard.png", dpi=110)
        plt.close(fig)
        files["CV against the public leaderboard"] = "cv_vs_leaderboard.png"

    if oof[chosen].ndim == 2:
        files["Confusion matrix (out of fold)"] = confusion_plot(out, oof[chosen], y, chosen, classes)
        return files
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


def confusion_plot(out: Path, p: np.ndarray, y: np.ndarray, model: str, classes: list[str] | None) -> str:
    """The chosen model's OOF confusion matrix, rows normalised (recall on the diagonal), counts
    written in each cell: which classes it mistakes for which."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    k = p.shape[1]
    names = list(classes) if classes else [str(c) for c in range(k)]
    counts = confusion_matrix(y, p.argmax(axis=1), labels=list(range(k)))
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * k, 0.6 + 0.55 * k))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize="small",
                        color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{model}: out-of-fold confusion (colour: share of the row)")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=110)
    plt.close(fig)
    return "confusion.png"
