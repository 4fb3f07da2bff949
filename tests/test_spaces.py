"""Every tune space in the repository parses and validates, trial by trial."""

from __future__ import annotations

from pathlib import Path

import pytest

from raymix.errors import RaymixError
from raymix.sweep import load_space, trial_name

SPACES = sorted((Path(__file__).resolve().parents[1] / "tune_spaces").glob("*.yaml"))


def test_spaces_exist() -> None:
    names = {p.stem for p in SPACES}
    assert {"quickstart", "smoke", "mixture_matters"} <= names


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_space_validates(path: Path) -> None:
    space = load_space(path)
    configs = space.configs()
    assert configs, path
    names = [trial_name(c) for c in configs]
    assert len(set(names)) == len(names), "two trials of one space share an identity"


def test_bad_space_names_the_key(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ngrid:\n  polcy.name: [uniform]\n")
    with pytest.raises(RaymixError, match=r"bad.yaml.*polcy.*did you mean 'policy'"):
        load_space(p)
    p.write_text("name: x\ngird: {}\n")
    with pytest.raises(RaymixError, match=r"unknown key\(s\) \['gird'\].*did you mean 'grid'"):
        load_space(p)
    p.write_text("name: x\ngrid:\n  seed: []\n")
    with pytest.raises(RaymixError, match="non-empty lists"):
        load_space(p)


def test_runtime_overrides_do_not_change_trial_identity() -> None:
    space = load_space(SPACES[0])
    a = [trial_name(c) for c in space.configs()]
    b = [trial_name(c) for c in space.configs(["runtime.use_gpu=true", "runtime.cpus_per_worker=4"])]
    assert a == b
    # Except the worker count where it sets the global batch (no
    # train.global_batch_tokens): 8 workers train 8 times the batch.
    c = [trial_name(c) for c in space.configs(["runtime.num_workers=8"])]
    d = [trial_name(c) for c in space.configs(["runtime.num_workers=8", "train.global_batch_tokens=16384"])]
    e = [trial_name(c) for c in space.configs(["runtime.num_workers=1", "train.global_batch_tokens=16384"])]
    assert not set(a) & set(c) and d == e


def test_space_with_wrong_type_or_unknown_key_is_refused_naming_key_and_file(tmp_path: Path, monkeypatch) -> None:
    """A space file is checked whole, key by key, before the sweep starts Ray
    or any trial: the message names the file and the key."""
    from raymix import sweep

    p = tmp_path / "typo.yaml"
    cases = {
        "name: x\nmax_concurrent_trials: two\ngrid: {seed: [0]}\n": r"typo.yaml: max_concurrent_trials must be an integer >= 1.*'two' \(str\)",
        "name: x\nmax_concurrent_trials: 0\ngrid: {seed: [0]}\n": r"typo.yaml: max_concurrent_trials must be",
        "name: x\ntrial_cpus: lots\ngrid: {seed: [0]}\n": r"typo.yaml: trial_cpus must be a number >= 0, got 'lots'",
        "name: [a, b]\ngrid: {seed: [0]}\n": r"typo.yaml: name must be a string",
        "name: x\nbase: [seed]\n": r"typo.yaml: base must be a mapping",
        "name: x\ngrid: {seed: 0}\n": r"typo.yaml: grid must map config keys to non-empty lists of values.*\(grid.seed: 0\)",
        "name: x\ngrid: {budget.fraction: [lots]}\n": r"typo.yaml: .*budget.fraction",
        "name: x\nbase: {train.lr: fast}\ngrid: {seed: [0]}\n": r"typo.yaml: .*train.lr",
        "name: x\nbase: {train.lrate: 0.1}\ngrid: {seed: [0]}\n": r"typo.yaml: .*train.lrate.*did you mean 'lr'",
        "name: x\nmax_trials: 2\ngrid: {seed: [0]}\n": r"typo.yaml: unknown key\(s\) \['max_trials'\]",
    }
    started = []
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: started.append(a))
    for text, pattern in cases.items():
        p.write_text(text)
        with pytest.raises(RaymixError, match=pattern):
            load_space(p)
        assert sweep.main(["--space", str(p), "--output", str(tmp_path / "out")]) == 2, text
    assert not started and not (tmp_path / "out").exists()


def test_sweep_on_a_cluster_retries_lost_workers_by_default() -> None:
    """Joining a running cluster (RAY_ADDRESS, as ray job submit sets it), a
    sweep's trials restart lost workers from their last checkpoint unless
    the space or --set says otherwise; locally nothing changes."""
    from raymix.sweep import CLUSTER_MAX_FAILURES, cluster_defaults

    smoke = load_space(Path(SPACES[0]).parent / "smoke.yaml")
    cluster = {"RAY_ADDRESS": "http://127.0.0.1:8265"}
    assert cluster_defaults(smoke, [], env={}) == []
    extra = cluster_defaults(smoke, [], env=cluster)
    assert extra == [f"runtime.max_failures={CLUSTER_MAX_FAILURES}"] and CLUSTER_MAX_FAILURES > 0
    assert all(c.runtime.max_failures == CLUSTER_MAX_FAILURES for c in smoke.configs(extra))
    assert [trial_name(c) for c in smoke.configs(extra)] == [trial_name(c) for c in smoke.configs()]
    assert cluster_defaults(smoke, ["runtime.max_failures=0"], env=cluster) == []  # the user's choice stands
    paper = load_space(Path(SPACES[0]).parent / "adapt_paper.yaml")
    assert cluster_defaults(paper, [], env=cluster) == []
    assert all(c.runtime.max_failures == 3 for c in paper.configs()[:3])


def test_set_on_a_grid_key_fixes_that_axis() -> None:
    from raymix.sweep import load_space

    space = load_space(Path(__file__).resolve().parent.parent / "tune_spaces" / "adapt_compare.yaml")
    assert len(space.configs()) == 54
    one = space.configs(["budget.fraction=0.01", "seed=0"])
    assert len(one) == 6 and {c.budget.fraction for c in one} == {0.01} and {c.seed for c in one} == {0}
    assert sorted((c.policy.name, c.policy.temperature) for c in one if c.policy.name == "temperature") == [
        ("temperature", 2.0), ("temperature", 5.0)]


def test_grid_list_is_the_union_of_its_products(tmp_path: Path) -> None:
    p = tmp_path / "union.yaml"
    p.write_text("name: u\ngrid:\n  - {budget.fraction: [0.01, 0.05], seed: [0]}\n  - {budget.fraction: [1.0], "
                 "seed: [0, 1]}\n")
    configs = load_space(p).configs()
    assert [(c.budget.fraction, c.seed) for c in configs] == [(0.01, 0), (0.05, 0), (1.0, 0), (1.0, 1)]
    p.write_text("name: u\ngrid:\n  - {seed: []}\n")
    with pytest.raises(RaymixError, match="non-empty lists"):
        load_space(p)


def test_set_inside_a_grid_axis_of_mappings_changes_that_field_in_each() -> None:
    """``--set policy.adapt.every_steps=20`` on a space whose ``policy`` axis
    lists mappings runs ADAPT at 20 (the grid's value was applied after it,
    silently); ``--set`` on a section fixes every axis inside it."""
    from raymix.sweep import load_space

    space = load_space(Path(__file__).resolve().parent.parent / "tune_spaces" / "adapt_cadence.yaml")
    configs = space.configs(["policy.adapt.every_steps=20", "seed=0", "budget.fraction=0.01"])
    adapt = [c.policy.adapt.every_steps for c in configs if c.policy.name == "adapt"]
    assert adapt and set(adapt) == {20}
    assert {c.policy.name for c in configs} == {c.policy.name for c in space.configs()}
    uniform = space.configs(["policy={name: uniform}", "seed=0", "budget.fraction=0.01"])
    assert len(uniform) == 1 and uniform[0].policy.name == "uniform"
