"""Sweeps on Ray Tune: budgets x models x policies x seeds from a YAML space.

    python -m raymix.sweep --space tune_spaces/quickstart.yaml [--set key=value ...]
                           [--output DIR] [--resume] [--no-report] [--tracking-uri URI]

Each trial is one budgeted run (``raymix.driver.run``: a Tune function
trainable that launches a ``TorchTrainer``, the Ray Train V2 pattern) with its
own MLflow run nested under the sweep's parent run. Trials are named by an
identity hash of the fields that change results, so ``--resume`` after a
killed driver runs only the trials that have no FINISHED MLflow run, and never
logs a finished trial twice. Concurrent trials log through an MLflow server
(see :func:`run_sweep`). The sweep's report is generated from MLflow at the
end (``raymix.report``) and attached to the parent run, with the best trial
per budget as its tags.

A space file:

    name: quickstart                 # the MLflow experiment and output folder
    base: {model.preset: llama-micro}   # overrides applied to every trial
    grid:                            # dotted config keys -> values (Cartesian product)
      policy.name: [uniform, proportional]
      budget.fraction: [0.01, 0.05]
      seed: [0]
    max_concurrent_trials: 1         # runtime only; default from the cluster's CPUs
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from raymix.config import RunConfig, identity_hash, load_config, parse_override
from raymix.errors import RaymixError
from raymix.files import write_json
from raymix.sweep_state import check_resume_identity, read_state, saved_store, space_record

SPACE_KEYS = ("name", "description", "base", "grid", "max_concurrent_trials", "trial_cpus")

CLUSTER_MAX_FAILURES = 3
"""``runtime.max_failures`` for trials of a sweep that joins a running
cluster (``RAY_ADDRESS``, as under ``ray job submit``) when neither the space
nor ``--set`` gives one: a lost worker or node (spot instances) restarts the
trial's workers from its last checkpoint instead of failing the trial.
Errors that would repeat are not retried: a non-finite loss stops the run
cleanly, and bad input is refused before training starts."""


@dataclass(frozen=True)
class Space:
    name: str
    base: dict[str, Any] = field(default_factory=dict)
    grid: Union[dict[str, list], list[dict[str, list]]] = field(default_factory=dict)
    """A mapping of config keys to lists of values (their product is the
    trials), or a list of such mappings (the union of their products: e.g.
    one dataset at two budgets and another at one)."""
    description: str = ""
    max_concurrent_trials: Optional[int] = None
    trial_cpus: float = 0.05
    """CPUs reserved for a trial's own driver process (its workers reserve theirs)."""

    def overrides(self, extra: Sequence[str] = ()) -> list[list[str]]:
        """One ``key=value`` override list per trial, grid order. An ``extra``
        override of a grid key, or of a section holding one, fixes that axis
        to its value (``--set budget.fraction=0.01`` runs the 1% slice of a
        space); one inside an axis whose values are mappings (``--set
        policy.adapt.every_steps=20`` where the axis is ``policy``) changes
        that field in each of them. ``extra`` comes last in every trial: the
        command line wins."""
        base = [f"{k}={_yaml_value(v)}" for k, v in self.base.items()]
        fixed = {ov.split("=", 1)[0].strip() for ov in extra}
        trials: list[list[str]] = []
        for grid in (self.grid if isinstance(self.grid, list) else [self.grid]):
            keys = [k for k in grid if not any(k == f or k.startswith(f + ".") for f in fixed)]
            for combo in itertools.product(*(grid[k] for k in keys)):
                trial = base + [f"{k}={_yaml_value(v)}" for k, v in zip(keys, combo)] + list(extra)
                if trial not in trials:  # fixing an axis can make two grids' trials one
                    trials.append(trial)
        return trials

    def configs(self, extra: Sequence[str] = ()) -> list[RunConfig]:
        out = []
        for i, ov in enumerate(self.overrides(extra)):
            try:
                out.append(load_config(None, ov))
            except RaymixError as e:
                raise RaymixError(f"space {self.name!r}, trial {i}: {e}") from None
        return out


def _yaml_value(value: Any) -> str:
    """One-line YAML for an override value (without the document-end marker
    PyYAML adds after a bare scalar)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return text[: -len("\n...")] if text.endswith("\n...") else text


def load_space(path: str | Path) -> Space:
    p = Path(path)
    if not p.is_file():
        raise RaymixError(f"--space {p}: no such file")
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RaymixError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise RaymixError(f"{p}: top level must be a mapping with name, base, grid")
    unknown = sorted(set(map(str, tree)) - set(SPACE_KEYS))
    if unknown:
        from raymix.config import _suggest

        raise RaymixError(f"{p}: unknown key(s) {unknown}{_suggest(unknown[0], SPACE_KEYS)}")
    _check_space_types(p, tree)
    grid = tree.get("grid") or {}
    grids = grid if isinstance(grid, list) and grid else [grid]
    for g in grids:
        bad = next((k for k, v in g.items() if not (isinstance(v, list) and v)), None) if isinstance(g, dict) else None
        if not isinstance(g, dict) or bad is not None:
            where = f" (grid.{bad}: {g[bad]!r})" if bad is not None else ""
            raise RaymixError(f"{p}: grid must map config keys to non-empty lists of values (or be a list of "
                              f"such mappings){where}")
    base = tree.get("base") or {}
    if not isinstance(base, dict):
        raise RaymixError(f"{p}: base must be a mapping of config keys to values")
    space = Space(
        name=str(tree.get("name") or p.stem),
        base=base,
        grid=grid,
        description=str(tree.get("description", "")),
        max_concurrent_trials=tree.get("max_concurrent_trials"),
        trial_cpus=float(0.05 if tree.get("trial_cpus") is None else tree["trial_cpus"]),
    )
    try:
        space.configs()  # every trial's config must validate before anything runs
    except RaymixError as e:
        raise RaymixError(f"{p}: {e}") from None
    return space


def _check_space_types(p: Path, tree: dict) -> None:
    """The space's own keys (config keys inside base and grid are checked by
    the config): refused naming the key, the file and the expected type."""
    def bad(key: str, expected: str) -> RaymixError:
        value = tree[key]
        return RaymixError(f"{p}: {key} must be {expected}, got {value!r} ({type(value).__name__})")

    for key in ("name", "description"):
        if tree.get(key) is not None and not isinstance(tree[key], str):
            raise bad(key, "a string")
    if tree.get("base") is not None and not isinstance(tree["base"], dict):
        raise bad("base", "a mapping of config keys to values")
    grid = tree.get("grid")
    if grid is not None and not (isinstance(grid, dict) or (isinstance(grid, list) and grid
                                                            and all(isinstance(g, dict) for g in grid))):
        raise bad("grid", "a mapping of config keys to lists of values, or a list of such mappings")
    n = tree.get("max_concurrent_trials")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise bad("max_concurrent_trials", "an integer >= 1 (or absent: derived from the cluster's CPUs)")
    c = tree.get("trial_cpus")
    if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or c < 0):
        raise bad("trial_cpus", "a number >= 0")


def cluster_defaults(space: Space, extra: Sequence[str], env=None) -> list[str]:
    """Overrides a sweep adds for a running cluster (``RAY_ADDRESS`` set):
    ``runtime.max_failures`` (:data:`CLUSTER_MAX_FAILURES`) unless the space
    or ``--set`` gives it. Runtime fields only: no trial's identity changes."""
    env = os.environ if env is None else env
    if not env.get("RAY_ADDRESS"):
        return []
    grids = space.grid if isinstance(space.grid, list) else [space.grid]
    given = [*space.base.items(), *((k, v) for g in grids for k, vs in g.items() for v in vs),
             *map(parse_override, extra)]

    def gives(key: str, value: Any, field: tuple[str, ...] = ("runtime", "max_failures")) -> bool:
        # The dotted key itself, or a mapping for a section above it that holds it.
        path = tuple(str(key).split("."))
        if path == field:
            return True
        if path != field[: len(path)] or not isinstance(value, dict):
            return False
        rest = field[len(path):]
        return rest[0] in value and (len(rest) == 1 or gives(rest[0], value[rest[0]], rest))

    if any(gives(k, v) for k, v in given):
        return []
    return [f"runtime.max_failures={CLUSTER_MAX_FAILURES}"]


def trial_name(cfg: RunConfig) -> str:
    budget = f"t{cfg.budget.tokens}" if cfg.budget.tokens else f"f{cfg.budget.fraction:g}"
    model = (cfg.model.pretrained or cfg.model.preset).rstrip("/").split("/")[-1]
    return f"{cfg.policy.name}-{budget}-{model}-s{cfg.seed}-{identity_hash(cfg)[:8]}"


def finished_identities(client, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """identity hash -> run id of trials of this sweep that FINISHED."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'FINISHED'",
        max_results=10000,
    )
    return {r.data.tags["raymix.identity"]: r.info.run_id for r in runs if "raymix.identity" in r.data.tags}


def _trial(params: dict) -> None:
    """The Tune function trainable: one budgeted run, its metrics reported to Tune."""
    from ray import tune

    from raymix.driver import run
    from raymix.driver.setup import enter_driver_dir

    # Ray Tune runs a trial in its own log directory: back to the sweep's
    # (relative paths in a space or --set). Outputs use absolute paths.
    enter_driver_dir()
    cfg = load_config(None, list(params["overrides"]) + [
        f"tracking.tracking_uri={params['tracking_uri']}", f"tracking.experiment={params['experiment']}"])
    out = Path(params["sweep_dir"]) / "trials" / trial_name(cfg)
    summary_file = out / "summary.json"
    if summary_file.exists():  # finished before a driver restart
        summary = json.loads(summary_file.read_text())
        # Written once all was logged: a run still RUNNING was cut off before it was ended.
        from raymix.tracking import end_if_running

        end_if_running(params["tracking_uri"], summary["mlflow_run_id"])
    elif (out / "run.json").exists():
        # A trial killed mid-run: the same MLflow run continues from the
        # trial's last checkpoint.
        summary = run(cfg, out, parent_run_id=params["parent_run_id"], resume=True)
    else:
        if out.exists():
            # Killed before its run was created: start again in a fresh
            # folder, keeping the old one for inspection.
            out.rename(out.with_name(out.name + f".interrupted-{int(time.time())}"))
        summary = run(cfg, out, parent_run_id=params["parent_run_id"])
    tune.report({k: summary[k] for k in ("worst_val_loss", "mean_val_loss", "worst_test_loss", "mean_test_loss",
                                         "mean_test_exact_match",
                                         "train_tokens", "budget_tokens", "wall_seconds")}
                | {"mlflow_run_id": summary["mlflow_run_id"], "trial": out.name})


def sweep_efficiency(summaries: Sequence[dict], wall_seconds: float) -> dict:
    """How much of a sweep's wall time its trials spent training: the sum of
    the trials' training-loop seconds over the sweep's wall time (above 1
    when trials train side by side). Multi-round trials count the loops of
    their final round only, and their wall time of all rounds."""
    loop = sum(s.get("train_loop_seconds", 0.0) for s in summaries)
    trial_wall = sum(s.get("total_wall_seconds_all_rounds", s.get("wall_seconds", 0.0)) for s in summaries)
    return {"sweep_wall_seconds": wall_seconds, "trials_timed": len(summaries),
            "trial_loop_seconds": loop, "trial_wall_seconds": trial_wall,
            "efficiency": loop / wall_seconds if wall_seconds > 0 else float("nan"),
            "trial_wall_share": trial_wall / wall_seconds if wall_seconds > 0 else float("nan")}


def write_sweep_summary(sweep_dir: Path, configs: Sequence[RunConfig], done: dict[str, str],
                        wall_seconds: Optional[float] = None, ran: Sequence[str] = ()) -> Path:
    """``DIR/sweep_summary.json``: every trial of the grid with its identity
    hash, status, summary.json path and MLflow run id; with ``wall_seconds``,
    the :func:`sweep_efficiency` of the trials this invocation ran (``ran``:
    their identities)."""
    trials, timed = [], []
    for cfg in configs:
        ident = identity_hash(cfg)
        name = trial_name(cfg)
        summary = sweep_dir / "trials" / name / "summary.json"
        trials.append({"trial": name, "identity": ident, "policy": cfg.policy.name, "seed": cfg.seed,
                       "status": "FINISHED" if ident in done else "MISSING",
                       "summary": str(summary) if summary.exists() else None,
                       "mlflow_run_id": done.get(ident)})
        if ident in ran and summary.exists():
            timed.append(json.loads(summary.read_text()))
    body: dict = {"trials": trials}
    if wall_seconds is not None and timed:
        body["timing"] = sweep_efficiency(timed, wall_seconds)
    path = sweep_dir / "sweep_summary.json"
    write_json(path, body, indent=1)
    return path


def concurrency(space: Space, configs: Sequence[RunConfig], cpus: float) -> int:
    """Trials at a time: the space's ``max_concurrent_trials``, else as many
    as the cluster's CPUs hold (one on a machine of 2 CPUs or fewer)."""
    from raymix.driver.setup import runs_at_a_time

    return runs_at_a_time(configs, cpus, space.trial_cpus, space.max_concurrent_trials)


def run_sweep(space: Space, extra: Sequence[str], output: Path, resume: bool, report: bool = True,
              report_dir: Optional[Path] = None, space_file: Optional[str] = None,
              tracking_uri: Optional[str] = None) -> dict:
    """Run the space's trials not yet FINISHED in MLflow, then the report.

    The MLflow store: ``tracking_uri`` (``--tracking-uri``), else
    ``MLFLOW_TRACKING_URI``, else ``tracking.tracking_uri``, else
    ``OUTPUT/mlflow.db``. An SQLite store with more than one trial at a
    time is served by an ``mlflow server`` this sweep starts and stops
    (:mod:`raymix.tracking_server`), so that only one process opens the
    file; one trial at a time opens it directly (no server to start: about
    30 s saved on 2 busy cores), as does a single run."""
    import ray

    from raymix.driver.setup import check_worker_resources, init_ray
    from raymix.tracking import check_reachable, ui_url
    from raymix.tracking_server import serve_if_concurrent

    configs = space.configs(extra)
    sweep_dir = output.resolve()
    state_file = sweep_dir / "sweep.json"
    if state_file.exists() and not resume:
        raise RaymixError(f"--output {sweep_dir} already holds sweep {space.name!r}; pass --resume to finish it "
                          "or choose another --output")
    if resume and not state_file.exists():
        raise RaymixError(f"--resume: {sweep_dir} holds no sweep to resume (no sweep.json)")
    state = read_state(state_file) if resume else {}
    if resume:
        check_resume_identity(space, state.get("extra", []), extra, configs, saved_space=state.get("space_record"))
    sweep_dir.mkdir(parents=True, exist_ok=True)

    default = f"sqlite:///{sweep_dir / 'mlflow.db'}"
    store = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or configs[0].tracking.tracking_uri
             or (resume and saved_store(state, default)) or default)
    check_reachable(store)
    init_ray(configs[0])
    # Before any trial starts: a trial whose worker group the local Ray can
    # never place beside the trial itself would wait for it forever.
    for cfg in configs:
        check_worker_resources(cfg, trial_cpus=space.trial_cpus)
    concurrent = concurrency(space, configs, ray.cluster_resources().get("CPU", 1))
    server, uri = serve_if_concurrent(store, sweep_dir, concurrent, len(configs), "trials")
    try:
        parent_id, exp_id = _run_trials(space, extra, configs, sweep_dir, resume, uri, store, concurrent)
    finally:
        if server is not None:
            server.stop()
    result = {"space": space.name, "trials": len(configs), "parent_run_id": parent_id,
              "experiment_id": exp_id, "tracking_uri": store, "sweep_dir": str(sweep_dir)}
    if server is not None:
        result["tracking_server"] = "stopped; it served " + uri
    if store.startswith(("http://", "https://")):
        result["mlflow_ui"] = ui_url(store, exp_id, parent_id)
    else:
        result["mlflow_ui"] = (f"mlflow ui --backend-store-uri {store} --host 127.0.0.1 --port 5000 --workers 1, "
                               f"then {ui_url('http://127.0.0.1:5000', exp_id, parent_id)}")
    if report:
        from raymix.report import annotate_parent_run, write_report

        path = write_report(store, space.name, report_dir or sweep_dir / "report", space_file)
        result["report"] = str(path)
        best = annotate_parent_run(store, parent_id, path.parent)
        result["best_trial_per_budget"] = ", ".join(f"{b}: run {r}" for b, r in best.items())
    return result


def _run_trials(space: Space, extra: Sequence[str], configs: Sequence[RunConfig], sweep_dir: Path, resume: bool,
                uri: str, store: str, concurrent: int) -> tuple[str, str]:
    """The sweep's parent run and its trials on Tune, logging to ``uri``
    (``store`` itself, or the server in front of it); returns the parent
    run's and the experiment's ids."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from ray import tune

    from raymix.driver.setup import prepare_model_and_data, runs_as_trials
    from raymix.tracking import EXPERIMENT_TAGS, check_active

    state_file = sweep_dir / "sweep.json"
    client = MlflowClient(uri)
    if resume:
        state = read_state(state_file)
        parent_id = state["parent_run_id"]
        try:
            client.get_run(parent_id)
        except MlflowException:
            raise RaymixError(f"--resume: sweep {space.name!r}'s parent run {parent_id} is not in the MLflow store "
                              f"{store}; it was started on {state.get('tracking_uri')}: resume with --tracking-uri "
                              f"{state.get('tracking_uri')} (or that store's server)") from None
    exp = client.get_experiment_by_name(space.name)
    if exp is not None:
        check_active(exp, uri, "name in the space file")
    exp_id = exp.experiment_id if exp else client.create_experiment(
        space.name, (sweep_dir / "mlartifacts").as_uri() if store.startswith("sqlite:") else None,
        tags=EXPERIMENT_TAGS)
    if exp is not None and not set(EXPERIMENT_TAGS) & set(exp.tags):  # made before raymix set the kind
        for key, value in EXPERIMENT_TAGS.items():
            client.set_experiment_tag(exp_id, key, value)

    if resume:
        client.set_terminated(parent_id, "RUNNING")
    else:
        parent = client.create_run(exp_id, run_name=space.name, tags={"raymix.sweep": space.name,
                                                                          "raymix.space": json.dumps(space.grid)})
        parent_id = parent.info.run_id
        state = {"space": space.name, "parent_run_id": parent_id, "experiment_id": exp_id,
                 "tracking_uri": store, "extra": list(extra), "space_record": space_record(space),
                 "started": time.time()}
        write_json(state_file, state, indent=1)
        client.log_text(parent_id, yaml.safe_dump({"name": space.name, "base": space.base, "grid": space.grid},
                                                  sort_keys=False), "space.yaml")
    status = "FAILED"
    t_sweep = time.time()
    try:
        done = finished_identities(client, exp_id, parent_id)
        todo = [(ov, cfg) for ov, cfg in zip(space.overrides(extra), configs) if identity_hash(cfg) not in done]
        print(f"[raymix] sweep {space.name}: {len(configs)} trials, {len(configs) - len(todo)} already finished, "
              f"{len(todo)} to run; MLflow {uri} experiment {space.name!r} parent run {parent_id}", flush=True)
        # Tokenise each distinct pool once, here, rather than in every trial.
        seen = set()
        for _, cfg in todo:
            key = json.dumps([str(cfg.data), str(cfg.model)])
            if key not in seen:
                seen.add(key)
                prepare_model_and_data(cfg, sweep_dir / "prepare")
        if todo:
            tuner = runs_as_trials(
                _trial,
                {"overrides": tune.grid_search([ov for ov, _ in todo]), "sweep_dir": str(sweep_dir),
                 "parent_run_id": parent_id, "tracking_uri": uri, "experiment": space.name},
                [c for _, c in todo], space.trial_cpus, concurrent, f"tune-{space.name}", sweep_dir / "ray")
            results = tuner.fit()
            errors = [r.error for r in results if r.error]
            if errors:
                raise RaymixError(f"{len(errors)} trial(s) failed; first: {errors[0]}")
        done = finished_identities(client, exp_id, parent_id)
        summary_path = write_sweep_summary(sweep_dir, configs, done, time.time() - t_sweep,
                                           ran=[identity_hash(c) for _, c in todo])
        timing = json.loads(summary_path.read_text()).get("timing")
        if timing:
            client.log_batch(parent_id, metrics=[Metric(f"sweep/{k}", float(v), int(time.time() * 1000), 0)
                                                 for k, v in timing.items()])
            print(f"[raymix] sweep efficiency: {timing['trial_loop_seconds']:.0f} s of trial training loops in "
                  f"{timing['sweep_wall_seconds']:.0f} s of wall time ({timing['efficiency']:.2f})", flush=True)
        missing = [trial_name(c) for c in configs if identity_hash(c) not in done]
        if missing:
            raise RaymixError(f"trials without a finished MLflow run: {missing}")
        status = "FINISHED"
    finally:
        client.set_terminated(parent_id, status)
    return parent_id, exp_id


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raymix.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", required=True, help="YAML search space (see tune_spaces/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field in every trial (a grid key: fix that axis)")
    parser.add_argument("--output", default=None, help="sweep directory (default: runs/<space name>)")
    parser.add_argument("--resume", action="store_true", help="finish a sweep whose driver was stopped")
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--report-dir", default=None, help="where the report goes (default: OUTPUT/report)")
    parser.add_argument("--dry-run", action="store_true", help="list the trials and exit")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store or server (default: MLFLOW_TRACKING_URI, else OUTPUT/mlflow.db, served "
                             "by an mlflow server the sweep starts when trials run concurrently)")
    args = parser.parse_args(argv)
    try:
        for item in args.overrides:
            parse_override(item)
        space = load_space(args.space)
        if args.dry_run:
            for cfg in space.configs(args.overrides):
                print(trial_name(cfg))
            return 0
        out = Path(args.output or Path("runs") / space.name)
        defaults = cluster_defaults(space, args.overrides)
        if defaults:
            print(f"[raymix] sweep joins the cluster at RAY_ADDRESS: {' '.join(defaults)} (a lost worker "
                  "restarts from the trial's last checkpoint; --set runtime.max_failures=N to change)", flush=True)
        result = run_sweep(space, defaults + list(args.overrides), out, args.resume, report=not args.no_report,
                           report_dir=Path(args.report_dir) if args.report_dir else None, space_file=args.space,
                           tracking_uri=args.tracking_uri)
    except RaymixError as e:
        print(f"raymix: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
