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
    b = [trial_name(c) for c in space.configs(["runtime.num_workers=8", "runtime.use_gpu=true"])]
    assert a == b


def test_set_on_a_grid_key_fixes_that_axis() -> None:
    from raymix.sweep import load_space

    space = load_space(Path(__file__).resolve().parent.parent / "tune_spaces" / "adapt_compare.yaml")
    assert len(space.configs()) == 54
    one = space.configs(["budget.fraction=0.01", "seed=0"])
    assert len(one) == 6 and {c.budget.fraction for c in one} == {0.01} and {c.seed for c in one} == {0}
    assert sorted((c.policy.name, c.policy.temperature) for c in one if c.policy.name == "temperature") == [
        ("temperature", 2.0), ("temperature", 5.0)]
