"""Bad input is refused with a message naming the file, field or flag, before
any training time is spent (no Ray needed for these)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raymix.config import load_config
from raymix.errors import RaymixError
from raymix.train import budget_tokens, prepare_model_and_data


def test_budget_beyond_repetition_cap_names_the_fields() -> None:
    cfg = load_config(None, ["budget.tokens=1000", "budget.max_epochs=2"])
    assert budget_tokens(cfg, 500) == 1000
    with pytest.raises(RaymixError, match=r"budget.max_epochs=2.0 x 400"):
        budget_tokens(cfg, 400)


def test_budget_fraction_rounding_to_zero_is_refused() -> None:
    cfg = load_config(None, ["budget.fraction=0.0001"])
    with pytest.raises(RaymixError, match="is 0 tokens"):
        budget_tokens(cfg, 1000)


def test_fraction_budget_is_rounded_share_of_pool() -> None:
    assert budget_tokens(load_config(None, ["budget.fraction=0.05"]), 123_456) == 6173


def _jsonl(tmp_path: Path, text: str) -> str:
    p = tmp_path / "tasks.jsonl"
    p.write_text(text)
    return str(p)


def test_missing_model_path_is_refused_before_tokenising(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, '{"prompt": "a", "completion": "b"}\n' * 3)
    cfg = load_config(None, [f"data.sources=[{{kind: jsonl, path: {path}}}]", "model.pretrained=/no/such/model"])
    with pytest.raises(RaymixError, match="model.pretrained.*/no/such/model.*does not exist"):
        prepare_model_and_data(cfg, tmp_path / "out")


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, '{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    cfg = load_config(None, [f"data.sources=[{{kind: jsonl, path: {path}}}]"])
    with pytest.raises(RaymixError, match=r"tasks.jsonl:2"):
        prepare_model_and_data(cfg, tmp_path / "out")


def test_duplicate_task_names_across_sources(tmp_path: Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "same.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
    (b / "same.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
    cfg = load_config(None, [f"data.sources=[{{kind: jsonl, path: {a}}}, {{kind: jsonl, path: {b}}}]"])
    with pytest.raises(RaymixError, match="duplicate task name 'same'"):
        prepare_model_and_data(cfg, tmp_path / "out")


def test_unknown_preset_suggests(tmp_path: Path) -> None:
    from raymix.models import build_model

    cfg = load_config(None, ["model.preset=llama-tinny"])
    with pytest.raises(RaymixError, match="did you mean 'llama-tiny'"):
        build_model(cfg.model, tokenizer=None, seed=0)


def test_unknown_source_kind_suggests() -> None:
    with pytest.raises(RaymixError, match="did you mean 'jsonl'"):
        load_config(None, ["data.sources=[{kind: jsonlines, path: x}]"])
