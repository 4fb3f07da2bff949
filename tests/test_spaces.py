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


def test_grid_list_is_the_union_of_its_products(tmp_path: Path) -> None:
    p = tmp_path / "union.yaml"
    p.write_text("name: u\ngrid:\n  - {budget.fraction: [0.01, 0.05], seed: [0]}\n  - {budget.fraction: [1.0], "
                 "seed: [0, 1]}\n")
    configs = load_space(p).configs()
    assert [(c.budget.fraction, c.seed) for c in configs] == [(0.01, 0), (0.05, 0), (1.0, 0), (1.0, 1)]
    p.write_text("name: u\ngrid:\n  - {seed: []}\n")
    with pytest.raises(RaymixError, match="non-empty lists"):
        load_space(p)
