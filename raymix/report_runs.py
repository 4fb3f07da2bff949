"""The runs a report reads: one row per finished trial of an MLflow
experiment (the latest run of each identity; a multi-round policy's rounds
folded into their run), with the labels that keep them apart in the tables:
``pool`` (the data the run trained on), ``budget`` and ``policy`` (its
variants told apart by the policy's own options and by any other setting
that changes the result: the runs of one table row differ in their seed
only)."""

from __future__ import annotations

import json
from pathlib import Path

from raymix.errors import RaymixError


def _budget_label(params: dict) -> str:
    tokens = params.get("budget.tokens", "null")
    if tokens not in ("null", "None", None):
        return f"{int(float(tokens)):,} tok"
    # As many digits as the fraction has (up to 6 significant): 1%, 5% and
    # 10% as before, 0.1% and 1.5% kept apart from 0% and 2%.
    return f"{float(params.get('budget.fraction', 'nan')) * 100:g}%"


def _budget_value(params: dict) -> float:
    tokens = params.get("budget.tokens", "null")
    if tokens not in ("null", "None", None):
        return float(tokens)
    return float(params.get("budget.fraction", "nan"))


def load_runs(tracking_uri: str, experiment: str):
    """One row per finished trial (the latest run of each identity)."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise RaymixError(f"--experiment: no MLflow experiment {experiment!r} at {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              max_results=10000, order_by=["attributes.start_time DESC"])
    # A multi-round run's last round (DoReMi's ``final``, or its ``proxy``
    # without one): runs recorded before DoReMi's driver copied that round's
    # curve and lm-eval scores onto its own run are read from the round.
    last_round: dict = {}
    for r in runs:
        parent, name = r.data.tags.get("mlflow.parentRunId"), r.data.tags.get("raymix.round")
        if parent and name in ("final", "proxy") and (parent not in last_round or name == "final"):
            last_round[parent] = r
    rows, seen, defaults = [], set(), _defaults()
    for r in runs:
        ident = r.data.tags.get("raymix.identity")
        # A round of a multi-run policy (IDEAL, DoReMi) is part of its run's row, not a trial of its own.
        if ident is None or ident in seen or {"raymix.ideal_round", "raymix.round"} & set(r.data.tags):
            continue
        seen.add(ident)
        p = r.data.params
        row = {
            "run_id": r.info.run_id,
            "policy": p.get("policy.name", "?"),
            # A local model directory by its name: no path of the machine.
            "model": _shown(p["model.pretrained"]) if p.get("model.pretrained", "null") not in ("null", "None")
            else p.get("model.preset", "?"),
            "budget": _budget_label(p),
            "budget_value": _budget_value(p),
            "seed": int(p.get("seed", 0)),
        }
        row["_policy_params"] = {k: v for k, v in p.items() if k.startswith("policy.") and k != "policy.name"}
        row["_data_params"] = {k: _canonical_sources(v) if k == "data.sources" else v
                               for k, v in p.items() if k.startswith("data.") and k != "data.cache_dir"}
        row["_config_params"] = _config_params(p, defaults)
        row.update({k: v for k, v in r.data.metrics.items()})
        row["curve_run_id"] = r.info.run_id
        last = last_round.get(r.info.run_id)
        if last is not None and not any(k.startswith("curve/") for k in r.data.metrics):
            row.update({k: v for k, v in last.data.metrics.items() if k.startswith("eval/")})
            row["curve_run_id"] = last.info.run_id
        # Single-round runs: their total compute is their own.
        row.setdefault("total_train_tokens_all_rounds", row.get("train_tokens", float("nan")))
        row.setdefault("total_meta_tokens_all_rounds", row.get("meta_tokens", float("nan")))
        row.setdefault("total_wall_seconds_all_rounds", row.get("wall_seconds", float("nan")))
        rows.append(row)
    if not rows:
        raise RaymixError(f"experiment {experiment!r} has no finished raymix runs")
    _label_pools(rows)
    _label_variants(rows)
    _label_configs(rows)
    return client, exp, pd.DataFrame(_latest_per_seed(rows))


def _canonical_sources(value: str) -> str:
    """A run's ``data.sources`` param without the fields at a default of
    null (``revision``, ``id_column``): a source field added later leaves
    the runs recorded before it on the same pool."""
    from dataclasses import fields

    from raymix.config import SourceConfig

    try:
        sources = json.loads(value)
    except (TypeError, ValueError):
        return value
    if not isinstance(sources, list):
        return value
    nulls = {f.name for f in fields(SourceConfig) if f.default is None}
    return json.dumps([{k: v for k, v in src.items() if not (k in nulls and v is None)} if isinstance(src, dict)
                       else src for src in sources], sort_keys=True)


def _sources_label(value: str) -> str:
    """A short name for a run's ``data.sources``: each source's kind, its
    folder's name and whether task sizes were set."""
    try:
        sources = json.loads(value)
    except (TypeError, ValueError):
        return str(value)[:40]
    parts = []
    for src in sources if isinstance(sources, list) else []:
        kind = src.get("kind", "?") if isinstance(src, dict) else "?"
        path = src.get("path") if isinstance(src, dict) else None
        part = f"{kind} {Path(path).name}" if path else kind
        parts.append(part + (" (task sizes set)" if isinstance(src, dict) and src.get("task_sizes") else ""))
    return " + ".join(parts) or str(value)[:40]


def _label_pools(rows: list[dict]) -> None:
    """``pool``: which data a run trained on. Runs of one sweep may span pools
    (``compare_all``: the embedded default and the Natural Instructions
    sample); the tables and plots keep them apart. Named by the sources;
    where two pools share that name, by the ``data.*`` settings that differ."""
    idents = {json.dumps(row["_data_params"], sort_keys=True): row["_data_params"] for row in rows}
    base = {i: _sources_label(d.get("data.sources", "")) for i, d in idents.items()}
    names = dict(base)
    for i, d in idents.items():
        same = [o for o in idents if base[o] == base[i] and o != i]
        if same:
            keys = sorted(k for k in d if k != "data.sources"
                          and any(idents[o].get(k) != d.get(k) for o in same))
            names[i] += " (" + ", ".join(f"{k[len('data.'):]}={d.get(k)}" for k in keys) + ")" if keys else ""
    if len(set(names.values())) < len(names):  # identical labels left: number them
        for n, i in enumerate(sorted(idents)):
            names[i] += f" #{n + 1}"
    for row in rows:
        row["pool"] = names[json.dumps(row.pop("_data_params"), sort_keys=True)]


def _own_options(name: str, params: dict) -> dict:
    """The ``policy.*`` params that policy ``name`` reads (``POLICY_OPTIONS``;
    an option it does not list counts), an option block's JSON flattened to
    ``block.field``."""
    from raymix.config import POLICY_OPTIONS

    out = {}
    for key, value in params.items():
        field = key[len("policy."):].split(".")[0]
        if POLICY_OPTIONS.get(field, name) != name:
            continue
        try:
            parsed = json.loads(value)
        except (TypeError, ValueError):
            parsed = None
        if isinstance(parsed, dict):
            out.update({f"{key}.{k}": json.dumps(v, sort_keys=True) for k, v in parsed.items()})
        else:
            out[key] = value
    return out


BLOCK_SPELLED_OUT = 3
"""An option block (``policy.weights``: one field per task) with more
varying fields than this is labelled by the fields off the row's most
common value and ``others=`` that value, so that a static mixture over 23
tasks reads as the tasks it favours, not 23 numbers."""


def _option_parts(varying: list[str], own: dict) -> list[str]:
    """``field=value`` for each varying option; a block with more than
    ``BLOCK_SPELLED_OUT`` varying fields as ``block={a=.., others=v}``."""
    blocks: dict[str, list[str]] = {}
    for k in varying:
        blocks.setdefault(k.split(".")[1] if k.count(".") > 1 else k, []).append(k)
    parts = []
    for block, keys in blocks.items():
        if len(keys) <= BLOCK_SPELLED_OUT:
            parts += [f"{k[len('policy.'):]}={own.get(k)}" for k in keys]
            continue
        # the whole block, fields equal across rows included, so that
        # ``others`` is true of every field the label does not name
        keys = sorted(k for k in own if k.startswith(f"policy.{block}."))
        values = [own.get(k) for k in keys]
        common = max(set(values), key=lambda v: (values.count(v), str(v)))
        off = [f"{k[len('policy.') + len(block) + 1:]}={own.get(k)}" for k in keys if own.get(k) != common]
        parts.append(f"{block}={{" + ", ".join(off + [f"others={common}"]) + "}")
    return parts


def _label_variants(rows: list[dict]) -> None:
    """Runs of one policy with different settings of its own options
    (temperature t=2 and t=5) are different rows of the tables: ``policy``
    becomes ``name (field=value)`` for the options that differ between them
    (within a pool); ``policy_name`` keeps the registered name."""
    by_name: dict[tuple, list[dict]] = {}
    for row in rows:
        row["policy_name"] = row["policy"]
        row["_own"] = _own_options(row["policy"], row["_policy_params"])
        by_name.setdefault((row.get("pool"), row["policy"]), []).append(row)
    for (_, name), group in by_name.items():
        keys = sorted({k for row in group for k in row["_own"]})
        varying = [k for k in keys if len({row["_own"].get(k) for row in group}) > 1]
        for row in group:
            if varying:
                row["policy"] = f"{name} (" + ", ".join(_option_parts(varying, row["_own"])) + ")"
    for row in rows:
        del row["_policy_params"], row["_own"]


CONFIG_SECTIONS = ("model", "budget", "train", "eval")
"""The sections of a run's params, besides ``seed`` and those that ``pool``
(``data``) and the policy's variants (``policy``) already tell apart, that
change its result (``raymix.config.IDENTITY_SECTIONS``): runs that differ in
them are not seeds of one configuration. ``runtime`` and ``tracking`` do
not change it (they are not in the identity), except the worker count where
it sets the global batch (:func:`_config_params`)."""

NOT_RESULT = frozenset({
    # When to checkpoint, whether to recompute, how a step's examples are
    # laid out and which kernels compute them: identity_hash leaves them out.
    "train.checkpoint_tokens", "train.checkpoint_fraction", "train.checkpoints_to_keep",
    "train.gradient_checkpointing", "train.packing", "train.pack_length", "train.attention", "train.compile",
})
"""Params of :data:`CONFIG_SECTIONS` that do not change a run's result."""


def _defaults() -> dict[str, str]:
    """Every param at its default, as :func:`raymix.config.flatten` logs it:
    the value of a param a run recorded before it existed."""
    from raymix.config import RunConfig, flatten

    return flatten(RunConfig())


def _config_params(params: dict, defaults: dict | None = None) -> dict:
    """A run's params that change its result besides its seed, pool and
    policy options (:data:`CONFIG_SECTIONS` less :data:`NOT_RESULT`); one it
    did not record (logged before the field existed) at its default. With a
    global batch in tokens, how it is split in micro-batches is hardware."""
    defaults = _defaults() if defaults is None else defaults
    keys = {k for k in (*params, *defaults) if k.split(".")[0] in CONFIG_SECTIONS} - NOT_RESULT
    out = {k: params.get(k, defaults.get(k)) for k in keys}
    if out.get("train.global_batch_tokens") not in (None, "null", "None"):
        out.pop("train.micro_batch_size", None)
        out.pop("train.grad_accum", None)
    else:
        # A step trains micro_batch_size x grad_accum examples per worker: the
        # worker count sets the global batch (0, local mode, trains as 1 does).
        out["data_parallel_workers"] = max(1, int(params.get("runtime.num_workers",
                                                                 defaults.get("runtime.num_workers"))))
    return out


def _shown(value) -> str:
    """A param's value in a label: a path by its last part (a report carries
    no path of the machine it was made on)."""
    text = str(value)
    return Path(text).name if text.startswith(("/", "~")) else text


def _label_configs(rows: list[dict]) -> None:
    """Runs of one policy that differ in a setting besides their seed, pool
    and policy options (``train.lr`` 0.01 and 0.001, say) are different rows
    of the tables, not seeds of one: ``policy`` gains ``key=value`` for each
    setting that differs between the runs of a table row (pool, model,
    budget, policy), on every row of that pool and policy (a variant reads
    the same at every budget and model)."""
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row.get("pool"), row["model"], row["budget"], row["policy"]), []).append(row)
    def differing(group: list[dict]) -> set:
        keys = {k for row in group for k in row["_config_params"]}
        return {k for k in keys if len({row["_config_params"].get(k) for row in group}) > 1}

    varying: dict[tuple, set] = {}
    for (pool, _, _, policy), group in cells.items():
        varying.setdefault((pool, policy), set()).update(differing(group))
    # The same settings across policies: runs are compared (effective
    # tokens against the best static mixture, tokens on the hardest tasks
    # against uniform) only with runs of the same ``setting`` (``by``).
    shared: dict = {}
    for pool, model, budget in {k[:3] for k in cells}:
        shared.setdefault(pool, set()).update(
            differing([row for k, g in cells.items() if k[:3] == (pool, model, budget) for row in g]))
    for row in rows:
        row["setting"] = ", ".join(f"{k}={_shown(row['_config_params'].get(k))}"
                                   for k in sorted(shared[row.get("pool")]))
    for row in rows:
        params = row.pop("_config_params")
        keys = sorted(varying[(row.get("pool"), row["policy"])])
        if not keys:
            continue
        parts = ", ".join(f"{k}={_shown(params.get(k))}" for k in keys)
        labelled = row["policy"] != row.get("policy_name", row["policy"])  # already "name (options)"
        row["policy"] = f"{row['policy'][:-1]}, {parts})" if labelled else f"{row['policy']} ({parts})"


def _latest_per_seed(rows: list[dict]) -> list[dict]:
    """The latest run (``rows`` run newest first) of each table row and seed:
    runs that differ in nothing a label shows but their identity (one
    recorded before a field entered the identity and its rerun; a policy's
    unread option) are one trial, as are the runs of one identity."""
    seen, out = set(), []
    for row in rows:
        key = (row.get("pool"), row["model"], row["budget"], row["policy"], row["seed"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def by(df, *columns: str, setting: bool = True) -> list[str]:
    """Grouping keys: ``pool`` first where the frame has it (runs on
    different data are never averaged together), then ``setting`` where runs
    of one pool, model and budget differ in a setting besides their policy
    and seed (``train.lr``, say: they are compared within theirs; groups by
    ``policy`` need not, its label names the settings)."""
    keys = ["pool"] if "pool" in df else []
    if setting and "setting" in df and df["setting"].nunique() > 1:
        keys.append("setting")
    return keys + list(columns)


def signal_cost(summary: dict, round_summary) -> dict:
    """What a learned policy's worker-side signal cost in one run, from its
    ``summary.json``: ``updates``, ``seconds`` in all, ``meta_tokens`` it read
    (None where only the run's total is known: ``run_meta_tokens``, which
    also counts the curve's evaluations) and the training loop's seconds.
    DoReMi's signal runs in its proxy round (``round_summary(run_id)`` reads
    that round's summary); IDEAL's is its influence scorings between rounds.
    Bench and report read it alike."""
    nan = float("nan")
    proxy = [r for r in summary.get("doremi_rounds", []) if r.get("round") == "proxy"]
    if proxy:
        summary = round_summary(proxy[0]["mlflow_run_id"]) or {}
    scorings = [r for r in summary.get("ideal_rounds", []) if "influence_seconds" in r]
    loop = summary.get("train_loop_seconds", nan)
    if scorings:
        return {"updates": len(scorings), "seconds": summary.get("influence_seconds", nan),
                "meta_tokens": summary.get("influence_meta_tokens", nan), "run_meta_tokens": nan,
                "loop_seconds": loop}
    return {"updates": int(summary.get("meta_steps") or 0), "seconds": summary.get("meta_seconds") or 0.0,
            "meta_tokens": None, "run_meta_tokens": summary.get("meta_tokens", nan), "loop_seconds": loop}


def artifact_json(client, run_id: str, name: str):
    """A run's JSON artifact ``name``; None where the run has none."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, name, tmp)
        except Exception:  # an older or failed run without the artifact
            return None
        return json.loads(Path(local).read_text())
