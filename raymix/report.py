"""Reports generated from MLflow: tables and plots comparing policies across budgets.

    python -m raymix.report --experiment NAME --out DIR [--tracking-uri URI]

Reads every FINISHED trial run (tagged with an identity hash) of the
experiment, groups them by pool (where runs span more than one), model,
policy and budget (a policy's rows told apart by any setting besides the seed
that differs between its runs), and writes
``DIR/report.md`` with mean ± std over seeds of the run metrics (and of any
``eval/...`` metrics), plus PNG plots: metrics against budget per policy, the
applied mixture over tokens, and tokens per task. Nothing in it is written by
hand.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from raymix.errors import RaymixError
from raymix.policies import POLICIES, resolve
from raymix.report_mixture import add_mixture_movement
from raymix.report_mixture import section as mixture_section
from raymix.report_runs import artifact_json, by, load_runs, signal_cost

METRICS = [
    # Test: read by no policy, so the comparison. Validation: what ADAPT's
    # meta-gradient reads, kept beside it.
    ("worst_test_loss", "worst test loss", "{:.3f}"),
    ("mean_test_loss", "mean test loss", "{:.3f}"),
    ("worst_val_loss", "worst val loss", "{:.3f}"),
    ("mean_val_loss", "mean val loss", "{:.3f}"),
    ("mean_test_exact_match", "mean test EM", "{:.3f}"),
    ("train_tokens", "train tokens", "{:,.0f}"),
    ("meta_tokens", "meta tokens", "{:,.0f}"),
    ("effective_tokens", "effective tokens (train)", "{:.2f}"),
    ("effective_tokens_with_meta", "effective tokens (train + meta)", "{:.2f}"),
    ("wall_seconds", "wall s", "{:.0f}"),
    # Total compute: a multi-round policy (IDEAL) trains once per round.
    ("total_train_tokens_all_rounds", "train tokens, all rounds", "{:,.0f}"),
    ("total_meta_tokens_all_rounds", "meta tokens, all rounds", "{:,.0f}"),
    ("total_wall_seconds_all_rounds", "wall s, all rounds", "{:.0f}"),
]


def _public_uri(uri: str) -> str:
    """The tracking URI as a report may show it: a local store by its file
    name only (a report carries no path of the machine it was made on). A
    bare directory (``/home/me/mlruns``, which MLflow reads as a file store)
    is one too."""
    import re

    if uri.startswith(("sqlite:", "file:")):
        return f"{uri.split(':', 1)[0]}:///.../{Path(uri.split(':', 1)[1]).name}"
    if "://" not in uri and re.search(r"[\\/]", uri):  # a path, not a scheme ("databricks")
        name = re.split(r"[\\/]", uri.rstrip("\\/"))[-1]
        return f"file:///.../{name}"
    return uri


def _public_path(path: str) -> str:
    """A file as a report may name it: relative to the current directory
    when it lies under it (``tune_spaces/quickstart.yaml``), else by its name
    only (no absolute path of the machine)."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return Path(path).name


def _static_policies() -> set[str]:
    """Fixed mixtures: the baselines that effective tokens are measured against."""
    return {name for name, spec in POLICIES.items() if spec.static}


def _curve(client, run_id: str) -> list[tuple[float, float, float]]:
    """(train tokens, worst-case test loss, meta tokens so far) at each logged
    curve point; runs logged before the test curve existed fall back to the
    validation curve, and to NaN meta tokens."""
    tokens = {m.step: m.value for m in client.get_metric_history(run_id, "curve/train_tokens")}
    meta = {m.step: m.value for m in client.get_metric_history(run_id, "curve/meta_tokens")}
    worst = client.get_metric_history(run_id, "curve/worst_test_loss") or \
        client.get_metric_history(run_id, "curve/worst_val_loss")
    return sorted((tokens[m.step], m.value, meta.get(m.step, float("nan"))) for m in worst if m.step in tokens)


def add_effective_tokens(client, df):
    """Per run: the share of its budget at which its worst-case test loss
    curve first reaches the best static mixture's final point on the same
    curve (mean over seeds, same model and budget); NaN if it never does.
    ``effective_tokens`` counts train tokens only; ``effective_tokens_with_meta``
    adds the meta tokens spent by then (meta-gradients and evaluation), so a
    learned policy pays for its signal. Curves and target come from the same
    fixed test subset, which no policy reads."""
    import numpy as np

    df = df.copy()
    df["effective_tokens"] = np.nan
    df["effective_tokens_with_meta"] = np.nan
    curve_of = df["curve_run_id"] if "curve_run_id" in df else df["run_id"]
    curves = dict(zip(df["run_id"], (_curve(client, c) for c in curve_of)))
    for _, g in df.groupby(by(df, "model", "budget_value")):
        static = g[g.get("policy_name", g["policy"]).isin(_static_policies())]
        finals = {idx: curves[r][-1][1] for idx, r in static["run_id"].items() if curves[r]}
        if not finals:
            continue
        target = min(np.mean([finals[i] for i in rows.index if i in finals])
                     for _, rows in static.groupby("policy") if any(i in finals for i in rows.index))
        for idx, row in g.iterrows():
            budget = row.get("budget_tokens", float("nan"))
            for tokens, worst, meta in curves[row["run_id"]]:
                if worst <= target + 1e-12:
                    df.loc[idx, "effective_tokens"] = tokens / budget
                    df.loc[idx, "effective_tokens_with_meta"] = (tokens + meta) / budget
                    break
    return df


COST_METRICS = [
    ("signal_updates", "signal updates", "{:.0f}"),
    ("seconds_per_update", "s per update", "{:.3f}"),
    ("meta_tokens_per_update", "meta tokens per update", "{:,.0f}"),
    ("signal_loop_share", "signal s / training loop s", "{:.2f}"),
    ("mixer_update_seconds", "mixer s (all updates)", "{:.3f}"),
]


def add_update_costs(client, df):
    """What each learned policy's updates cost, from the runs' ``summary.json``:
    the updates of its worker-side signal (ADAPT's meta steps, DoReMi's
    excess-loss readings in its proxy round, Aioli's probe readings, GradEx's
    estimate; IDEAL's influence scorings between rounds), seconds and meta
    tokens per update (the run's meta tokens less those of a static run of
    the same pool and budget: the curve's fixed subsets), and the signal's
    time over the training loop's. Online Data Mixing has no worker-side
    signal: its updates are the mixer's (``mixer s``)."""
    import numpy as np

    df = df.copy()
    for key, _, _ in COST_METRICS[:-1]:
        df[key] = np.nan
    static = df[df.get("policy_name", df["policy"]).isin(_static_policies())]
    base = static.groupby(by(df, "model", "budget_value"))["meta_tokens"].median().to_dict()
    for idx, row in df.iterrows():
        if row.get("policy_name", row["policy"]) in _static_policies():
            continue
        s = artifact_json(client, row["run_id"], "summary.json") or {}
        cost = signal_cost(s, lambda run_id: artifact_json(client, run_id, "summary.json"))
        if not cost["updates"]:
            continue
        key = tuple(row[c] for c in by(df, "model", "budget_value"))
        read = cost["meta_tokens"]
        if read is None:
            read = cost["run_meta_tokens"] - base.get(key, np.nan)
        df.loc[idx, "signal_updates"] = cost["updates"]
        df.loc[idx, "seconds_per_update"] = cost["seconds"] / cost["updates"]
        df.loc[idx, "meta_tokens_per_update"] = read / cost["updates"]
        df.loc[idx, "signal_loop_share"] = cost["seconds"] / max(1e-9, cost["loop_seconds"])
    return df


def _fmt(mean: float, std: float, pattern: str, n: int) -> str:
    if mean != mean:
        return "–"
    text = pattern.format(mean)
    return f"{text} ± {pattern.format(std)}" if n > 1 and std == std else text


def _table(df, metrics, skip_empty: bool = False) -> list[str]:
    """One row per (pool,) model, budget and policy (its variants and
    settings labelled by ``load_runs``), ``seeds`` its distinct seeds; the
    pool column only where the runs span more than one; ``skip_empty`` leaves out rows
    without any of the metrics (runs of a pool no suite scores)."""
    pools = "pool" in df and df["pool"].nunique() > 1
    header = ("| pool " if pools else "") + "| model | policy | budget | seeds | " + \
        " | ".join(m[1] for m in metrics) + " |"
    lines = [header, "|" + "---|" * (4 + pools + len(metrics))]
    groups = df.groupby(by(df, "model", "budget_value", "budget", "policy", setting=False), sort=True)
    for names, g in groups:
        pool = names[0] if "pool" in df else None
        model, _, budget, policy = names[-4:]  # after the pool and any setting (the policy's label names it)
        cells = []
        for key, _, pattern in metrics:
            vals = g[key].dropna() if key in g else []
            cells.append(_fmt(float(vals.mean()) if len(vals) else float("nan"),
                              float(vals.std(ddof=1)) if len(vals) > 1 else float("nan"), pattern, len(vals)))
        if skip_empty and all(c == "–" for c in cells):
            continue
        seeds = g["seed"].nunique() if "seed" in g else len(g)  # load_runs keeps one run per seed
        lines.append((f"| {pool} " if pools else "") + f"| {model} | {policy} | {budget} | {seeds} | "
                     + " | ".join(cells) + " |")
    return lines


def _plot_metrics(df, keys, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if k in df]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pools = "pool" in df and df["pool"].nunique() > 1
        for names, g in df.groupby(by(df, "model", "policy", setting=False)):
            stats = g.groupby("budget_value")[key].agg(["mean", "std"]).reset_index()
            pool, (model, policy) = names[0] if "pool" in df else None, names[-2:]
            ax.errorbar(stats["budget_value"], stats["mean"], yerr=stats["std"].fillna(0), marker="o",
                        capsize=3, label=f"{policy} ({model}" + (f", {pool})" if pools else ")"))
        ax.set_xscale("log")
        ax.set_xlabel("budget (fraction of pool tokens, or tokens)")
        ax.set_title(key)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_mixtures(client, df, path: Path) -> bool:
    """Each task's applied weight relative to uniform over training tokens (a
    heatmap, task names on rows): one panel per policy, at the largest
    budget, seed 0 (or lowest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raymix.tracking import LABEL_ALL_TASKS, mixture_heatmap, mixture_lim, plot_height

    top = df[df["budget_value"] == df["budget_value"].max()]
    picks = top.sort_values("seed").groupby(["model", "policy"]).head(1)
    if picks.empty:
        return False
    schedules = [(artifact_json(client, row["run_id"], "mixture_schedule.json") or [], row)
                 for _, row in picks.iterrows()]
    T = max((len(s[0][1]) for s, _ in schedules if s), default=1)
    # Above LABEL_ALL_TASKS each panel sorts its tasks by its own weights: rows differ between panels.
    fig, axes = plt.subplots(1, len(picks), figsize=(4.5 * len(picks) + 2, plot_height(T)),
                             squeeze=False, sharey=T <= LABEL_ALL_TASKS)
    img = None
    # One colour scale for every panel, so that colours compare across policies.
    lim = max([mixture_lim(s, list(s[0][1])) for s, _ in schedules if s] or [1.0])
    for ax, (schedule, row) in zip(axes[0], schedules):
        if not schedule:
            continue
        tasks = list(schedule[0][1])
        end = row.get("train_tokens", schedule[-1][0])
        img = mixture_heatmap(ax, schedule, tasks, end, lim) or img
        ax.set_title(f"{row['policy']} ({row['budget']})", fontsize=9)
    if img is not None:
        fig.colorbar(img, ax=list(axes[0]), fraction=0.02, pad=0.01).set_label("weight / uniform (log2)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _plot_allocation(client, df, path: Path) -> bool:
    """Train tokens per task at the largest budget, one bar group per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    top = df[df["budget_value"] == df["budget_value"].max()]
    picks = top.sort_values("seed").groupby(["model", "policy"]).head(1)
    ledgers = {f"{r['policy']} ({r['model']})": artifact_json(client, r["run_id"], "ledger.json")
               for _, r in picks.iterrows()}
    ledgers = {k: v for k, v in ledgers.items() if v}
    if not ledgers:
        return False
    from raymix.tracking import LABEL_ALL_TASKS

    tasks = list(next(iter(ledgers.values())))
    if len(tasks) > LABEL_ALL_TASKS:
        return _plot_sorted_allocation(ledgers, tasks, path)
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(tasks)), 4.5))
    width = 0.8 / len(ledgers)
    for i, (label, ledger) in enumerate(ledgers.items()):
        ax.bar(np.arange(len(tasks)) + i * width, [ledger.get(t, {}).get("train_tokens", 0) for t in tasks],
               width, label=label)
    totals = [sum(row.get("train_tokens", 0) for row in ledger.values()) for ledger in ledgers.values()]
    ax.axhline(np.mean(totals) / max(1, len(tasks)), color="k", linestyle="--", linewidth=1,
               label="uniform share")
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2)
    ax.set_xticklabels(tasks, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("train tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_sorted_allocation(ledgers: dict, tasks: list, path: Path) -> bool:
    """Many tasks: each policy's train tokens per task sorted from most to
    least (the allocation's shape), the uniform share, and the tasks each
    policy gave the most tokens named in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from raymix.tracking import LABELLED_TASKS

    fig, ax = plt.subplots(figsize=(10, 4.5))
    k = min(3, LABELLED_TASKS)
    for label, ledger in ledgers.items():
        tokens = {t: ledger.get(t, {}).get("train_tokens", 0) for t in tasks}
        order = sorted(tasks, key=lambda t: -tokens[t])
        ax.plot(np.arange(1, len(order) + 1), [tokens[t] for t in order], drawstyle="steps-mid",
                label=f"{label}; most: {', '.join(order[:k])}")
    totals = [sum(row.get("train_tokens", 0) for row in ledger.values()) for ledger in ledgers.values()]
    ax.axhline(np.mean(totals) / max(1, len(tasks)), color="k", linestyle="--", linewidth=1, label="uniform share")
    ax.set_xlabel(f"task rank by train tokens (of {len(tasks)} tasks)")
    ax.set_ylabel("train tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(tracking_uri: str, experiment: str, out: str | Path, space_file: Optional[str] = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    client, exp, df = load_runs(tracking_uri, experiment)
    df = add_effective_tokens(client, df)
    eval_keys = sorted(k for k in df.columns if k.startswith("eval/"))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    lines = [
        f"# raymix report: {experiment}",
        "",
        f"Generated by `python -m raymix.report --experiment {experiment}` from MLflow "
        f"(`{_public_uri(tracking_uri)}`, experiment id {exp.experiment_id}) at raymix commit `{commit}`"
        + (f", space `{_public_path(space_file)}`" if space_file else "") + ".",
        f"{len(df)} finished trial runs; values are mean ± sample std over seeds. "
        "Test loss is on each task's test split, which no policy reads (ADAPT's meta-gradient "
        "reads the validation split); compare policies on it. "
        "Effective tokens: the share of the budget at which a run's worst-case test loss "
        "(logged at evenly spaced points on a fixed test subset) first reaches the best static mixture's "
        "final worst-case loss at the same budget, counting train tokens only, or train plus meta tokens "
        "(meta-gradients and evaluation) spent by then; – where it never does.",
        "",
        "## Policies x budgets",
        "",
        *_table(df, METRICS + ([("eval/aggregate", "OOD eval (lm-eval)", "{:.3f}")]
                               if "eval/aggregate" in df else [])),
        "",
    ]
    df = add_mixture_movement(client, df)
    lines += mixture_section(df, _table)
    df = add_update_costs(client, df)
    learned = df[~df["policy_name"].isin(_static_policies())]
    if len(learned):
        lines += ["## Cost of the policies' updates", "",
                  "Per run, from its `summary.json`: the updates of the policy's worker-side signal (ADAPT's "
                  "meta steps, DoReMi's excess-loss readings in its proxy round, Aioli's probe readings, GradEx's "
                  "estimate, IDEAL's influence scorings between rounds), seconds and meta tokens per update (the "
                  "run's meta tokens less a static run's at the same pool and budget: the curve's fixed subsets), "
                  "and the signal's seconds over the training loop's; Online Data Mixing has no worker-side "
                  "signal, its updates are the mixer's. Multi-round policies also train once per round "
                  "(\"all rounds\" columns above).", "", *_table(learned, COST_METRICS), ""]
    if eval_keys:
        lines += ["## Evaluation", "", *_table(df, [(k, k[len("eval/"):], "{:.3f}") for k in eval_keys], skip_empty=True), ""]
    names = df["policy_name"] if "policy_name" in df else df["policy"]
    for name in sorted(set(names)):
        spec = POLICIES.get(name)
        if spec is not None and spec.report_section is not None:
            lines += resolve(spec.report_section)(df[names == name], _table)
    _plot_metrics(df, ["worst_test_loss", "mean_test_loss", "worst_val_loss", "mean_test_exact_match"],
                  out / "metrics_vs_budget.png")
    lines += ["## Plots", "", "![metrics against budget](metrics_vs_budget.png)", ""]
    pools = sorted(df["pool"].unique()) if df["pool"].nunique() > 1 else [None]
    for pool in pools:
        part = df if pool is None else df[df["pool"] == pool]
        suffix, where = ("", "") if pool is None else (f"_{_slug(pool)}", f"; {pool}")
        if _plot_mixtures(client, part, out / f"mixtures{suffix}.png"):
            lines += ["Applied mixture over training tokens, each task's weight relative to uniform "
                      f"(log2; red: more than uniform, blue: less; largest budget{where}):", "",
                      f"![mixtures](mixtures{suffix}.png)", ""]
        if _plot_allocation(client, part, out / f"allocation{suffix}.png"):
            lines += [f"Training tokens per task, with the uniform share (largest budget{where}):", "",
                      f"![allocation](allocation{suffix}.png)", ""]
    lines += ["## Runs", "", "| run | pool | model | policy | budget | seed |", "|---|---|---|---|---|---|"]
    for _, r in df.sort_values(["pool", "model", "budget_value", "policy", "seed"]).iterrows():
        lines.append(f"| `{r['run_id']}` | {r['pool']} | {r['model']} | {r['policy']} | {r['budget']} | {r['seed']} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _slug(text: str) -> str:
    """``text`` as a file name or MLflow key can hold it."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "pool"


def _budget_key(row) -> str:
    """A budget as an MLflow tag key can hold it (no commas or %): ``t4000``
    for tokens, ``f0.01`` for a fraction of the pool (as in trial names)."""
    value = float(row["budget_value"])
    return f"t{int(value)}" if str(row["budget"]).endswith("tok") else f"f{value:g}"


def best_per_budget(df) -> dict[str, str]:
    """``{budget key: run id}`` of the trial with the lowest worst-case test
    loss at each budget (keyed ``model.budget`` when the runs span models,
    prefixed with the pool when they span pools)."""
    best = {}
    several_models = df["model"].nunique() > 1
    several_pools = "pool" in df and df["pool"].nunique() > 1
    for _, group in df.dropna(subset=["worst_test_loss"]).groupby(by(df, "model", "budget_value")):
        row = group.loc[group["worst_test_loss"].idxmin()]
        key = f"{row['model']}.{_budget_key(row)}" if several_models else _budget_key(row)
        if "setting" in by(df):  # runs of one budget differ in a setting: one best per setting
            key = f"{_slug(row['setting'])}.{key}"
        best[f"{_slug(row['pool'])}.{key}" if several_pools else key] = row["run_id"]
    return best


def annotate_parent_run(tracking_uri: str, parent_run_id: str, report_dir: str | Path) -> dict[str, str]:
    """What a reader of a sweep's parent run in the MLflow UI wants first:
    the report (``report.md`` and its plots) as artifacts under ``report/``,
    its comparison table as the run's description (``mlflow.note.content``,
    shown on the run's page), and the best trial per budget by worst-case
    test loss as tags ``raymix.best.<budget>`` ("trial · run id · loss") and
    metrics ``best/<budget>/worst_test_loss`` (columns of the runs table).
    Returns ``{budget: run id}``."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    report_dir = Path(report_dir)
    now = int(time.time() * 1000)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment(client.get_run(parent_run_id).info.experiment_id).name
    _, _, df = load_runs(tracking_uri, experiment)
    best = best_per_budget(df)
    losses = df.set_index("run_id")["worst_test_loss"]
    for budget, run_id in best.items():
        trial = Path(client.get_run(run_id).data.tags.get("raymix.output_dir", run_id)).name
        client.set_tag(parent_run_id, f"raymix.best.{budget}",
                       f"{trial} · run {run_id} · worst test loss {losses[run_id]:.4f}")
    # The metrics that compare policies, one table: the full report (all
    # metrics, evaluation, plots) is in the artifacts.
    keys = [m for m in METRICS if m[0] in ("worst_test_loss", "mean_test_loss", "mean_test_exact_match",
                                            "effective_tokens")]
    note = [f"# {experiment}", "", "Best trial per budget (lowest worst-case test loss): "
            + ", ".join(f"{b}: `{r}`" for b, r in best.items()), "", *_table(df, keys), "",
            "The full report with its plots: the artifacts under `report/`."]
    client.log_batch(parent_run_id, metrics=[Metric(f"best/{b}/worst_test_loss", float(losses[r]), now, 0)
                                             for b, r in best.items()])
    client.set_tag(parent_run_id, "mlflow.note.content", "\n".join(note))
    client.log_artifacts(parent_run_id, str(report_dir), "report")
    return best


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raymix.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    parser.add_argument("--space", default=None, help="space file to link from the report")
    args = parser.parse_args(argv)
    if not args.tracking_uri:
        print("raymix: error: --tracking-uri or MLFLOW_TRACKING_URI is required", file=sys.stderr)
        return 2
    try:
        path = write_report(args.tracking_uri, args.experiment, args.out, args.space)
    except RaymixError as e:
        print(f"raymix: error: {e}", file=sys.stderr)
        return 2
    print(f"[raymix] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
