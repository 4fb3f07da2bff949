"""raymix.report: effective tokens with and without meta tokens on the test
curve, and the mixture pictures (a fake MLflow client); the runs a report
reads, its rows and what it names, over a real MLflow store of fake
finished runs (``_store``)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pd = pytest.importorskip("pandas")


class FakeClient:
    def __init__(self, histories: dict, artifacts: dict):
        self.histories, self.artifacts = histories, artifacts

    def get_metric_history(self, run_id, key):
        return [SimpleNamespace(step=s, value=v) for s, v in self.histories.get(run_id, {}).get(key, [])]

    def download_artifacts(self, run_id, name, tmp):
        path = Path(tmp) / name
        path.write_text(json.dumps(self.artifacts[run_id][name]))
        return str(path)


def _store(tmp_path: Path, runs: list[tuple[list[str], dict]]) -> str:
    """A sqlite MLflow store under ``tmp_path`` with experiment ``e``: one
    finished run per ``(overrides, metrics)``, its params and identity
    logged the way ``raymix.tracking`` logs them."""
    pytest.importorskip("mlflow")
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from raymix.config import flatten, identity_hash, load_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    for i, (overrides, metrics) in enumerate(runs):  # started in this order, a second apart
        cfg = load_config(None, overrides)
        run = client.create_run(exp, start_time=1_700_000_000_000 + 1000 * i,
                                tags={"raymix.identity": identity_hash(cfg)})
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flatten(cfg).items()],
                         metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
        client.set_terminated(run.info.run_id, "FINISHED")
    return uri


def _client_and_runs():
    tasks = ["a", "b", "c"]
    sched = {"u": [[0, {t: 1 / 3 for t in tasks}]],
             "l": [[0, {t: 1 / 3 for t in tasks}], [500, {"a": 0.6, "b": 0.3, "c": 0.1}]]}
    histories = {
        # static: reaches 2.0 at the end; learned: reaches it halfway, with 100 meta tokens spent by then
        "u": {"curve/train_tokens": [(0, 0), (1, 500), (2, 1000)], "curve/worst_test_loss": [(0, 3), (1, 2.5), (2, 2.0)],
              "curve/meta_tokens": [(0, 10), (1, 20), (2, 30)]},
        "l": {"curve/train_tokens": [(0, 0), (1, 500), (2, 1000)], "curve/worst_test_loss": [(0, 3), (1, 1.9), (2, 1.5)],
              "curve/meta_tokens": [(0, 10), (1, 100), (2, 200)]},
    }
    artifacts = {r: {"mixture_schedule.json": sched[r],
                     "ledger.json": {t: {"train_tokens": 300 + 100 * i, "meta_tokens": 0} for i, t in enumerate(tasks)}}
                 for r in ("u", "l")}
    df = pd.DataFrame([
        {"run_id": "u", "policy": "uniform", "model": "m", "budget": "1%", "budget_value": 0.01, "seed": 0,
         "budget_tokens": 1000, "train_tokens": 1000},
        {"run_id": "l", "policy": "adapt", "model": "m", "budget": "1%", "budget_value": 0.01, "seed": 0,
         "budget_tokens": 1000, "train_tokens": 1000},
    ])
    return FakeClient(histories, artifacts), df


def test_effective_tokens_with_and_without_meta_tokens() -> None:
    from raymix.report import add_effective_tokens

    client, df = _client_and_runs()
    out = add_effective_tokens(client, df).set_index("run_id")
    assert out.loc["l", "effective_tokens"] == pytest.approx(0.5)
    assert out.loc["l", "effective_tokens_with_meta"] == pytest.approx(0.6)
    assert out.loc["u", "effective_tokens"] == pytest.approx(1.0)
    assert np.isfinite(out.loc["u", "effective_tokens_with_meta"])


def test_mixture_pictures_are_written(tmp_path: Path) -> None:
    from raymix.report import _plot_allocation, _plot_mixtures

    client, df = _client_and_runs()
    assert _plot_mixtures(client, df, tmp_path / "mixtures.png")
    assert _plot_allocation(client, df, tmp_path / "allocation.png")
    assert (tmp_path / "mixtures.png").stat().st_size > 1000 and (tmp_path / "allocation.png").stat().st_size > 1000


def test_run_mixture_plot_is_written(tmp_path: Path) -> None:
    from raymix.tracking import plot_mixture

    client, _ = _client_and_runs()
    sched = client.artifacts["l"]["mixture_schedule.json"]
    ledger = client.artifacts["l"]["ledger.json"]
    path = plot_mixture(sched, ledger, tmp_path / "mixture.png", 1000)
    assert path.stat().st_size > 1000


def test_policy_variants_get_their_own_rows() -> None:
    from raymix.report_runs import _label_variants

    rows = [{"policy": "temperature", "_policy_params": {"policy.temperature": "2.0", "policy.adapt.lr": "0.2"}},
            {"policy": "temperature", "_policy_params": {"policy.temperature": "5.0", "policy.adapt.lr": "0.2"}},
            {"policy": "uniform", "_policy_params": {"policy.temperature": "2.0"}}]
    _label_variants(rows)
    assert [r["policy"] for r in rows] == ["temperature (temperature=2.0)", "temperature (temperature=5.0)", "uniform"]
    assert [r["policy_name"] for r in rows] == ["temperature", "temperature", "uniform"]
    assert all("_policy_params" not in r for r in rows)


def test_variants_are_labelled_by_the_policys_own_options_within_a_pool() -> None:
    """Every run records every policy's options: an ADAPT block that differs
    between pools labels neither the other policies nor ADAPT itself (its
    runs differ only across pools); within a pool, the flattened fields that
    differ label ADAPT's variants."""
    from raymix.report_runs import _label_pools, _label_variants

    def row(policy, every, sources):
        return {"policy": policy, "_policy_params": {"policy.adapt": json.dumps({"every_steps": every, "lr": 0.2}),
                                                     "policy.temperature": "2.0"},
                "_data_params": {"data.sources": json.dumps(sources), "data.max_seq_len": "128"}}

    synthetic = [{"kind": "synthetic", "path": None}]
    ni = [{"kind": "natural_instructions", "path": "../shared/data/ni-sample", "task_sizes": {"a": 1}}]
    rows = [row("uniform", 20, synthetic), row("uniform", 5, ni), row("adapt", 20, synthetic),
            row("adapt", 5, ni), row("adapt", 10, ni)]
    _label_pools(rows)
    _label_variants(rows)
    assert [r["pool"] for r in rows] == ["synthetic", "natural_instructions ni-sample (task sizes set)"] + \
        ["synthetic"] + ["natural_instructions ni-sample (task sizes set)"] * 2
    assert [r["policy"] for r in rows] == ["uniform", "uniform", "adapt", "adapt (adapt.every_steps=5)",
                                           "adapt (adapt.every_steps=10)"]
    # two pools of the same sources apart by the data settings that differ
    rows = [row("uniform", 20, synthetic), row("uniform", 20, synthetic)]
    rows[1]["_data_params"]["data.max_seq_len"] = "256"
    _label_pools(rows)
    assert [r["pool"] for r in rows] == ["synthetic (max_seq_len=128)", "synthetic (max_seq_len=256)"]


def test_tables_keep_pools_apart() -> None:
    from raymix.report import _table, best_per_budget

    df = pd.DataFrame([
        {"run_id": "a", "pool": "p1", "policy": "uniform", "model": "m", "budget": "100%", "budget_value": 1.0,
         "seed": 0, "worst_test_loss": 1.0},
        {"run_id": "b", "pool": "p2", "policy": "uniform", "model": "m", "budget": "100%", "budget_value": 1.0,
         "seed": 0, "worst_test_loss": 3.0},
    ])
    lines = _table(df, [("worst_test_loss", "worst test loss", "{:.1f}")])
    assert lines[0].startswith("| pool | model |") and lines[2:] == [
        "| p1 | m | uniform | 100% | 1 | 1.0 |", "| p2 | m | uniform | 100% | 1 | 3.0 |"]
    assert best_per_budget(df) == {"p1.f1": "a", "p2.f1": "b"}
    with_eval = df.assign(**{"eval/aggregate": [0.5, float("nan")]})
    assert _table(with_eval, [("eval/aggregate", "aggregate", "{:.1f}")], skip_empty=True)[2:] == [
        "| p1 | m | uniform | 100% | 1 | 0.5 |"]
    one = df[df["pool"] == "p1"]
    assert _table(one, [("worst_test_loss", "w", "{:.1f}")])[0].startswith("| model |")


def test_update_costs_from_the_runs_summaries() -> None:
    """Seconds and meta tokens per signal update: ADAPT's meta steps, its
    meta tokens less a static run's at the same budget; DoReMi's from its
    proxy round's summary; static policies have none."""
    from raymix.report import add_update_costs

    summaries = {
        "u": {"meta_tokens": 100, "meta_steps": 0, "meta_seconds": 0.0, "train_loop_seconds": 10.0},
        "a": {"meta_tokens": 500, "meta_steps": 4, "meta_seconds": 2.0, "train_loop_seconds": 10.0},
        "d": {"meta_tokens": 100, "meta_steps": 0, "doremi_rounds": [{"round": "proxy", "mlflow_run_id": "dp"}]},
        "dp": {"meta_tokens": 300, "meta_steps": 10, "meta_seconds": 1.0, "train_loop_seconds": 5.0},
    }
    client = FakeClient({}, {r: {"summary.json": s} for r, s in summaries.items()})
    df = pd.DataFrame([{"run_id": r, "policy": p, "policy_name": p, "model": "m", "budget": "1%",
                        "budget_value": 0.01, "seed": 0, "meta_tokens": summaries[r]["meta_tokens"]}
                       for r, p in (("u", "uniform"), ("a", "adapt"), ("d", "doremi"))])
    out = add_update_costs(client, df).set_index("run_id")
    assert out.loc["a", ["signal_updates", "seconds_per_update", "meta_tokens_per_update",
                         "signal_loop_share"]].tolist() == [4, 0.5, 100, 0.2]
    assert out.loc["d", ["signal_updates", "seconds_per_update", "meta_tokens_per_update"]].tolist() == [10, 0.1, 20]
    assert np.isnan(out.loc["u", "signal_updates"])


def test_signal_cost_of_multi_round_policies() -> None:
    """DoReMi's signal is its proxy round's; IDEAL's its influence scorings
    between rounds, with the tokens they read; a one-run policy's meta steps."""
    from raymix.report_runs import signal_cost

    proxy = {"meta_steps": 10, "meta_seconds": 1.0, "meta_tokens": 300, "train_loop_seconds": 5.0}
    doremi = {"meta_steps": 0, "doremi_rounds": [{"round": "reference", "mlflow_run_id": "r"},
                                                  {"round": "proxy", "mlflow_run_id": "p"}]}
    assert signal_cost(doremi, {"p": proxy}.get) == {"updates": 10, "seconds": 1.0, "meta_tokens": None,
                                                     "run_meta_tokens": 300, "loop_seconds": 5.0}
    ideal = {"meta_steps": 0, "influence_seconds": 4.0, "influence_meta_tokens": 50, "train_loop_seconds": 8.0,
             "ideal_rounds": [{"round": 1, "influence_seconds": 4.0}, {"round": 2}]}
    cost = signal_cost(ideal, {}.get)
    assert (cost["updates"], cost["seconds"], cost["meta_tokens"]) == (1, 4.0, 50)
    assert signal_cost({"meta_steps": 3, "meta_seconds": 0.3, "meta_tokens": 9}, {}.get)["updates"] == 3


def test_mixture_movement_kl_and_tokens_on_the_hardest_tasks() -> None:
    """Token-averaged KL from uniform, and the tokens a run gives uniform's
    hardest quarter of tasks over uniform's; by hand on three tasks."""
    from raymix.report_mixture import add_mixture_movement, hardest_tasks, mean_kl_uniform

    client, df = _client_and_runs()
    # "l" trained 500 tokens at uniform, then 500 at (0.6, 0.3, 0.1).
    p = np.array([0.6, 0.3, 0.1])
    kl = float(np.log(3) + (p * np.log(p)).sum())
    assert mean_kl_uniform(client.artifacts["l"]["mixture_schedule.json"], 1000) == pytest.approx(kl / 2, rel=1e-12)
    assert mean_kl_uniform(client.artifacts["u"]["mixture_schedule.json"], 1000) == pytest.approx(0.0, abs=1e-15)
    assert np.isnan(mean_kl_uniform([], 1000))
    # Under uniform, "c" has the highest test loss: the hardest quarter of 3 tasks is ["c"].
    assert hardest_tasks([{"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 1.5, "b": 2.5, "c": 2.9}]) == ["c"]
    assert hardest_tasks([{t: float(i) for i, t in enumerate("abcdefgh")}]) == ["h", "g"]
    df["policy_name"] = df["policy"]
    for t, loss in zip("abc", (1.0, 2.0, 3.0)):
        df[f"test_loss/{t}"] = loss
    client.artifacts["l"]["ledger.json"] = {"a": {"train_tokens": 200}, "b": {"train_tokens": 300},
                                            "c": {"train_tokens": 750}}
    out = add_mixture_movement(client, df).set_index("run_id")
    assert out.loc["u", "hardest_tokens_vs_uniform"] == pytest.approx(1.0)
    assert out.loc["l", "hardest_tokens_vs_uniform"] == pytest.approx(750 / 500)
    assert out.loc["l", "hardest_tasks"] == "c"
    assert out.loc["l", "kl_uniform_mean"] == pytest.approx(kl / 2, rel=1e-12)
    # Without a uniform run at that budget there is nothing to compare with.
    alone = add_mixture_movement(client, df[df["policy"] != "uniform"])
    assert alone["hardest_tokens_vs_uniform"].isna().all()


def test_a_mixture_over_many_tasks_is_labelled_by_the_tasks_it_favours() -> None:
    """Static mixtures whose weights all differ between rows: each row names
    the tasks off its own most common weight and that weight as ``others``,
    instead of one ``weights.task=...`` per task."""
    from raymix.report_runs import _label_variants

    def row(weights):
        return {"policy": "static", "_policy_params": {"policy.weights": json.dumps(weights)}}

    tasks = ["a", "b", "c", "d", "e"]
    rows = [row({t: (0.6 if t == "a" else 0.1) for t in tasks}),
            row({t: (0.4 if t in "ab" else 0.0667) for t in tasks}),
            row({t: 0.2 for t in tasks})]
    _label_variants(rows)
    assert [r["policy"] for r in rows] == ["static (weights={a=0.6, others=0.1})",
                                           "static (weights={a=0.4, b=0.4, others=0.0667})",
                                           "static (weights={others=0.2})"]
    # a field equal in every row but off the row's common value is named too:
    # ``others`` must be true of every field left out
    rows = [row({**{t: (0.6 if t == "a" else 0.1) for t in tasks}, "f": 0.05}),
            row({**{t: 0.2 for t in tasks}, "f": 0.05})]
    _label_variants(rows)
    assert [r["policy"] for r in rows] == ["static (weights={a=0.6, f=0.05, others=0.1})",
                                           "static (weights={f=0.05, others=0.2})"]
    # few varying fields stay spelled out
    rows = [row({"a": 0.5, "b": 0.5}), row({"a": 0.9, "b": 0.1})]
    _label_variants(rows)
    assert [r["policy"] for r in rows] == ["static (weights.a=0.5, weights.b=0.5)",
                                           "static (weights.a=0.9, weights.b=0.1)"]


def test_distinct_fraction_budgets_get_distinct_labels() -> None:
    """A fraction budget's label keeps the digits that tell it apart: 0.1%,
    0.2% and 0.4% do not all read "0%", nor 1.5% "2%" beside 2% (runs at
    those budgets would share a label in the tables); round budgets read as
    they always did."""
    from raymix.report_runs import _budget_label

    def label(fraction):
        return _budget_label({"budget.tokens": "null", "budget.fraction": str(fraction)})

    assert [label(f) for f in (0.001, 0.002, 0.004, 0.015, 0.02)] == ["0.1%", "0.2%", "0.4%", "1.5%", "2%"]
    assert [label(f) for f in (0.01, 0.05, 0.1, 0.5, 1.0, 2.0)] == ["1%", "5%", "10%", "50%", "100%", "200%"]
    assert _budget_label({"budget.tokens": "4000", "budget.fraction": "0.01"}) == "4,000 tok"


def test_report_names_no_absolute_path_of_the_machine(tmp_path: Path, monkeypatch) -> None:
    """report.md names the space file relative to the current directory when
    it lies under it, else by its name only (``--space /abs/path/x.yaml``
    was written verbatim), and a local store and a local model directory
    by their names only."""
    from raymix.report import write_report

    uri = _store(tmp_path, [([f"model.pretrained={tmp_path / 'models' / 'my-model'}"],
                             {"worst_test_loss": 1.0, "mean_test_loss": 1.0, "worst_val_loss": 1.0,
                              "train_tokens": 10.0, "meta_tokens": 0.0, "budget_tokens": 10.0})])
    space = tmp_path / "spaces" / "my_space.yaml"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the space file does not lie under it
    text = write_report(uri, "e", tmp_path / "report", str(space)).read_text()
    assert str(tmp_path) not in text, [ln for ln in text.splitlines() if str(tmp_path) in ln]
    assert "space `my_space.yaml`" in text and "`sqlite:///.../mlflow.db`" in text
    assert "| my-model |" in text  # a local model directory by its name
    monkeypatch.chdir(tmp_path)  # it does
    text = write_report(uri, "e", tmp_path / "report", str(space)).read_text()
    assert str(tmp_path) not in text and "space `spaces/my_space.yaml`" in text


def test_a_bare_path_tracking_uri_is_named_like_a_file_store() -> None:
    """MLflow reads a bare directory (``MLFLOW_TRACKING_URI=/home/me/mlruns``)
    as a file store: the report names it by its last part only, as it does
    ``file:`` and ``sqlite:`` stores; a server's URI stays as it is."""
    from raymix.report import _public_uri

    assert _public_uri("/home/me/mlruns") == "file:///.../mlruns"
    assert _public_uri("/home/me/mlruns/") == "file:///.../mlruns"
    assert _public_uri("file:///home/me/mlruns") == "file:///.../mlruns"
    assert _public_uri("sqlite:////home/me/mlflow.db") == "sqlite:///.../mlflow.db"
    assert _public_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert _public_uri("databricks") == "databricks"


def test_runs_of_different_configurations_are_not_averaged_as_seeds(tmp_path: Path) -> None:
    """A table row averages seeds of one configuration only: runs that differ
    in any setting that changes the result (``train.lr``, ``model.vocab_size``,
    ``budget.max_epochs``, ...) are rows of their own, labelled by the
    settings that differ (beside the policy's own options), at every budget
    of that policy; ``seeds`` counts distinct seeds. Runtime and tracking
    settings do not split a row, and of two runs of one row and seed (one
    differs only in an option its policy does not read) the latest counts."""
    from raymix.report import _table
    from raymix.report_runs import load_runs

    def loss(v):
        return {"worst_test_loss": v}

    uri = _store(tmp_path, [
        # a grid over train.lr: one seed each, different results
        (["train.lr=0.01"], loss(1.0)), (["train.lr=0.001"], loss(3.0)),
        # a second seed of lr 0.01, run with other resources: a seed of the same row
        (["train.lr=0.01", "seed=1", "runtime.cpus_per_worker=2", "tracking.run_name=x"], loss(2.0)),
        # lr 0.01 only at 2%: still labelled, so that each variant reads the same at every budget
        (["train.lr=0.01", "budget.fraction=0.02"], loss(0.5)),
        # the same run as seed 1 above but for an option uniform does not read: the later one counts
        (["train.lr=0.01", "seed=1", "policy.temperature=5.0"], loss(4.0)),
        # a policy's variants and a model setting that differs between them
        (["policy.name=temperature", "policy.temperature=2.0"], loss(1.0)),
        (["policy.name=temperature", "policy.temperature=5.0", "model.vocab_size=512"], loss(1.0)),
        (["policy.name=temperature", "policy.temperature=5.0", "budget.max_epochs=2.0"], loss(1.0)),
    ])
    _, _, df = load_runs(uri, "e")
    rows = _table(df, [("worst_test_loss", "worst test loss", "{:.1f}")])[2:]
    assert rows == [
        # one run: nothing to tell apart within its row
        "| llama-micro | temperature (temperature=2.0) | 1% | 1 | 1.0 |",
        "| llama-micro | temperature (temperature=5.0, budget.max_epochs=2.0, model.vocab_size=2048) | 1% | 1 | 1.0 |",
        "| llama-micro | temperature (temperature=5.0, budget.max_epochs=8.0, model.vocab_size=512) | 1% | 1 | 1.0 |",
        "| llama-micro | uniform (train.lr=0.001) | 1% | 1 | 3.0 |",
        "| llama-micro | uniform (train.lr=0.01) | 1% | 2 | 2.5 ± 2.1 |",  # seed 1's later run: 4.0
        "| llama-micro | uniform (train.lr=0.01) | 2% | 1 | 0.5 |",
    ], rows
    assert sorted(df["policy_name"]) == ["temperature"] * 3 + ["uniform"] * 4


def test_settings_that_leave_the_result_alone_do_not_split_a_row() -> None:
    """What ``_config_params`` compares between the runs of a row: a param a
    run recorded before it existed counts at its default (older runs stay
    seeds of their reruns); checkpointing, packing and kernels, and with a
    global batch in tokens its split in micro-batches, are left out."""
    from raymix.report_runs import _config_params, _defaults

    defaults = _defaults()
    old = {k: v for k, v in defaults.items() if k != "eval.curve_max_examples"}
    assert _config_params(old, defaults) == _config_params(defaults, defaults)
    assert _config_params({**defaults, "train.packing": "false", "train.attention": "eager"}, defaults) == \
        _config_params(defaults, defaults)
    batch = {**defaults, "train.global_batch_tokens": "4096"}
    assert _config_params({**batch, "train.micro_batch_size": "4", "train.grad_accum": "4"}, defaults) == \
        _config_params(batch, defaults)
    assert _config_params({**defaults, "train.lr": "0.001"}, defaults) != _config_params(defaults, defaults)
    # The worker count sets the global batch without one in tokens (local
    # mode trains as one worker does); with one, it is hardware.
    def workers(n, params=defaults):
        return _config_params({**params, "runtime.num_workers": str(n)}, defaults)

    assert workers(0) == workers(1) != workers(2) != workers(4)
    assert workers(1, batch) == workers(2, batch) == workers(8, batch)


def test_effective_tokens_compare_runs_of_one_setting(monkeypatch) -> None:
    """Effective tokens measure a run against the best static mixture of its
    own setting: with a sweep over ``train.lr``, ADAPT at lr 0.01 against
    uniform at lr 0.01, not against uniform at a learning rate it did not
    train with."""
    import pandas as pd

    import raymix.report as report

    curves = {  # run id -> [(train tokens, worst test loss, meta tokens)]
        "u-a": [(50, 3.0, 0), (100, 2.0, 0)], "u-b": [(50, 1.5, 0), (100, 1.0, 0)],
        "ad-a": [(50, 1.9, 5), (100, 1.8, 10)], "ad-b": [(50, 1.2, 5), (100, 0.9, 10)]}
    monkeypatch.setattr(report, "_curve", lambda client, run: curves[run])
    df = pd.DataFrame([{"run_id": r, "policy": p, "policy_name": p, "model": "m", "budget_value": 0.01,
                        "budget_tokens": 100, "setting": f"train.lr={lr}", "pool": "embedded"}
                       for r, p, lr in (("u-a", "uniform", 0.01), ("u-b", "uniform", 0.001),
                                        ("ad-a", "adapt", 0.01), ("ad-b", "adapt", 0.001))])
    out = report.add_effective_tokens(None, df).set_index("run_id")
    assert out.loc["ad-a", "effective_tokens"] == 0.5  # reaches uniform lr 0.01's 2.0 at half the budget
    assert out.loc["ad-b", "effective_tokens"] == 1.0  # reaches uniform lr 0.001's 1.0 at the end
    assert out.loc["ad-a", "effective_tokens_with_meta"] == 0.55


def test_a_source_field_added_later_leaves_older_runs_on_their_pool() -> None:
    """``data.sources`` as logged before ``revision`` and ``id_column``
    existed and after (with them null) is one pool."""
    import json

    from raymix.report_runs import _label_pools

    old = [{"kind": "natural_instructions", "path": "../shared/data/ni-sample", "task_sizes": None}]
    new = [{**old[0], "revision": None, "id_column": None}]
    rows = [{"_data_params": {"data.sources": json.dumps(s), "data.max_seq_len": "256"}} for s in (old, new)]
    from raymix.report_runs import _canonical_sources
    for row in rows:
        row["_data_params"]["data.sources"] = _canonical_sources(row["_data_params"]["data.sources"])
    _label_pools(rows)
    assert rows[0]["pool"] == rows[1]["pool"] == "natural_instructions ni-sample"
