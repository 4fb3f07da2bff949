"""Tests for raymix.config: building, YAML round trips, overrides, validation,
flattening for MLflow and the identity hash."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from raymix.config import (
    BudgetConfig,
    DataConfig,
    ModelConfig,
    PolicyConfig,
    RunConfig,
    SourceConfig,
    flatten,
    from_dict,
    identity_hash,
    is_secret_key,
    load_config,
    parse_override,
    to_dict,
    to_yaml,
)
from raymix.errors import RaymixError
from raymix.policies import POLICIES

# --------------------------------------------------------------------------- defaults


def test_defaults_build() -> None:
    cfg = RunConfig()
    assert cfg.seed == 0
    assert cfg.policy.name == "uniform"
    assert cfg.budget.fraction == 0.01
    assert cfg.budget.tokens is None
    assert cfg.data.sources == [SourceConfig(kind="synthetic")]
    assert cfg.train.betas == (0.9, 0.95)


def test_load_config_without_path_is_default() -> None:
    assert load_config() == RunConfig()


# --------------------------------------------------------------------------- YAML round trip


def test_yaml_round_trip_default(tmp_path: Path) -> None:
    cfg = RunConfig()
    f = tmp_path / "run.yaml"
    f.write_text(to_yaml(cfg), encoding="utf-8")
    assert load_config(f) == cfg


def test_yaml_round_trip_non_default(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "seed=7",
            "data.sources=[{kind: jsonl, path: /data/x.jsonl, task_sizes: {a: 10}}, {kind: synthetic, scale: 0.5}]",
            "policy.name=static",
            "policy.weights={a: 2, b: 0.5}",
            "budget.tokens=12345",
            "train.betas=[0.8, 0.99]",
            "model.dtype=bfloat16",
            "tracking.run_name=hello",
        ],
    )
    f = tmp_path / "run.yaml"
    f.write_text(to_yaml(cfg), encoding="utf-8")
    again = load_config(f)
    assert again == cfg
    assert again.train.betas == (0.8, 0.99)
    assert again.data.sources[0].task_sizes == {"a": 10}
    assert again.policy.weights == {"a": 2.0, "b": 0.5}
    # and the dict form is plain data
    assert yaml.safe_load(to_yaml(cfg)) == to_dict(cfg)


# --------------------------------------------------------------------------- --set overrides


def test_override_typed_values() -> None:
    cfg = load_config(
        None,
        [
            "seed=3",
            "train.lr=1.0e-4",
            "train.micro_batch_size=8",
            "budget.fraction=0.5",
            "runtime.use_gpu=true",
            "data.sources=[{kind: natural_instructions, path: /x}]",
            "policy.weights={a: 1, b: 3}",
            "policy.schedule=[[0, {a: 1}], [100, {b: 1}]]",
        ],
    )
    assert cfg.seed == 3 and isinstance(cfg.seed, int)
    # YAML parses "1e-4" to the float64 nearest 1e-4; approx only spares the spelling.
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.micro_batch_size == 8
    assert cfg.budget.fraction == 0.5
    assert cfg.runtime.use_gpu is True
    assert cfg.data.sources == [SourceConfig(kind="natural_instructions", path="/x")]
    assert isinstance(cfg.data.sources[0], SourceConfig)
    assert cfg.policy.weights == {"a": 1.0, "b": 3.0}
    assert all(isinstance(v, float) for v in cfg.policy.weights.values())
    assert cfg.policy.schedule == [[0, {"a": 1}], [100, {"b": 1}]]


def test_override_int_written_as_float_is_accepted_for_int_fields() -> None:
    cfg = load_config(None, ["train.micro_batch_size=16.0", "budget.tokens=1000000.0"])
    assert cfg.train.micro_batch_size == 16 and isinstance(cfg.train.micro_batch_size, int)
    assert cfg.budget.tokens == 1_000_000 and isinstance(cfg.budget.tokens, int)
    # an int where a float is expected becomes a float
    cfg = load_config(None, ["train.lr=1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_override_exponent_float_without_dot() -> None:
    assert load_config(None, ["train.lr=1e-4"]).train.lr == pytest.approx(1e-4)  # as above


def test_override_on_top_of_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("seed: 5\npolicy:\n  name: temperature\n  temperature: 3.0\n", encoding="utf-8")
    cfg = load_config(f, ["policy.temperature=4", "train.lr=0.01"])
    assert cfg.seed == 5
    assert cfg.policy.name == "temperature"
    assert cfg.policy.temperature == 4.0
    assert cfg.train.lr == 0.01


def test_parse_override() -> None:
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override(" a.b =x=y") == ("a.b", "x=y")
    assert parse_override("a=") == ("a", "")
    with pytest.raises(RaymixError, match="expected key=value"):
        parse_override("novalue")
    with pytest.raises(RaymixError, match="not valid YAML"):
        parse_override("a=[1, 2")


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "item, bad, suggestion",
    [
        ("polcy.name=uniform", "polcy", "policy"),
        ("sed=1", "sed", "seed"),
        ("train.lrr=0.1", "train.lrr", "lr"),
        ("budget.fractoin=0.1", "budget.fractoin", "fraction"),
        ("policy.temprature=2", "policy.temprature", "temperature"),
    ],
)
def test_unknown_override_key(item: str, bad: str, suggestion: str) -> None:
    with pytest.raises(RaymixError) as ei:
        load_config(None, [item])
    msg = str(ei.value)
    assert repr(bad) in msg
    assert f"did you mean {suggestion!r}" in msg


def test_unknown_key_in_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lrr: 0.1\n", encoding="utf-8")
    with pytest.raises(RaymixError) as ei:
        load_config(f)
    msg = str(ei.value)
    assert "train.lrr" in msg
    assert "did you mean 'lr'" in msg
    assert str(f) in msg


def test_unknown_top_level_key_in_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("polcy:\n  name: uniform\n", encoding="utf-8")
    with pytest.raises(RaymixError) as ei:
        load_config(f)
    assert "'polcy'" in str(ei.value)
    assert "did you mean 'policy'" in str(ei.value)


def test_unknown_key_inside_list_of_sources() -> None:
    with pytest.raises(RaymixError) as ei:
        load_config(None, ["data.sources=[{kind: jsonl, pth: /x}]"])
    assert "data.sources[0].pth" in str(ei.value)
    assert "did you mean 'path'" in str(ei.value)


# --------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "item, field_name, expected",
    [
        ("train.lr=abc", "train.lr", "expected a number"),
        ("seed=1.5", "seed", "expected an integer"),
        ("runtime.use_gpu=3", "runtime.use_gpu", "expected true or false"),
        ("train.micro_batch_size=true", "train.micro_batch_size", "expected an integer"),
        ("policy.temperature=true", "policy.temperature", "expected a number"),
        ("model.preset=3", "model.preset", "expected a string"),
        ("data.sources=abc", "data.sources", "expected a list"),
        ("policy.weights=[1, 2]", "policy.weights", "expected a mapping"),
        ("policy.weights={a: x}", "policy.weights.a", "expected a number"),
        ("train.betas=[0.9]", "train.betas", "expected a list of 2 values"),
        ("data=5", "data", "expected a mapping"),
    ],
)
def test_wrong_type_names_field(item: str, field_name: str, expected: str) -> None:
    with pytest.raises(RaymixError) as ei:
        load_config(None, [item])
    msg = str(ei.value)
    assert msg.startswith(f"{field_name}:") or f"{field_name}:" in msg
    assert expected in msg


# --------------------------------------------------------------------------- policy name


def test_unknown_policy_suggests_closest() -> None:
    with pytest.raises(RaymixError) as ei:
        load_config(None, ["policy.name=unimx"])
    msg = str(ei.value)
    assert "policy.name" in msg
    assert "'unimx'" in msg
    assert "did you mean 'unimax'" in msg
    for name in POLICIES:
        assert name in msg  # the choices are listed


def test_unknown_policy_without_close_match_lists_choices() -> None:
    with pytest.raises(RaymixError) as ei:
        RunConfig(policy=PolicyConfig(name="zzzzzzzz"))
    assert "did you mean" not in str(ei.value)
    assert "uniform" in str(ei.value)


def test_every_registered_policy_name_is_accepted() -> None:
    for name in POLICIES:
        assert RunConfig(policy=PolicyConfig(name=name)).policy.name == name


# --------------------------------------------------------------------------- value checks


@pytest.mark.parametrize("value", [0, -0.1])
def test_budget_fraction_must_be_positive(value: float) -> None:
    with pytest.raises(RaymixError, match="budget.fraction must be > 0"):
        BudgetConfig(fraction=value)
    with pytest.raises(RaymixError, match="budget.fraction"):
        load_config(None, [f"budget.fraction={value}"])


@pytest.mark.parametrize("value", [0, -5])
def test_budget_tokens_must_be_positive(value: int) -> None:
    with pytest.raises(RaymixError, match="budget.tokens must be > 0"):
        BudgetConfig(tokens=value)
    with pytest.raises(RaymixError, match="budget.tokens"):
        load_config(None, [f"budget.tokens={value}"])


def test_budget_needs_fraction_or_tokens() -> None:
    with pytest.raises(RaymixError, match="budget.fraction or budget.tokens"):
        BudgetConfig(fraction=None, tokens=None)
    # tokens alone is fine, and then the fraction is not checked
    assert BudgetConfig(fraction=None, tokens=10).tokens == 10
    assert BudgetConfig(fraction=-1.0, tokens=10).tokens == 10


def test_budget_max_epochs_positive() -> None:
    with pytest.raises(RaymixError, match="budget.max_epochs"):
        BudgetConfig(max_epochs=0)


@pytest.mark.parametrize(
    "item, where, bad",
    [
        ("data.template=chatt", "data.template", "'chatt'"),
        ("model.dtype=fp16", "model.dtype", "'fp16'"),
    ],
)
def test_literal_fields_reject_bad_values(item: str, where: str, bad: str) -> None:
    with pytest.raises(RaymixError) as ei:
        load_config(None, [item])
    msg = str(ei.value)
    assert where in msg and bad in msg
    assert "is not one of" in msg


def test_literal_suggestion() -> None:
    with pytest.raises(RaymixError, match="did you mean 'chat'"):
        load_config(None, ["data.template=chatt"])


def test_literal_fields_accept_every_allowed_value() -> None:
    for t in ("auto", "chat", "plain"):
        assert load_config(None, [f"data.template={t}"]).data.template == t
    for d in ("auto", "float32", "bfloat16"):
        assert load_config(None, [f"model.dtype={d}"]).model.dtype == d


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: SourceConfig(kind="csv"), "unknown source kind 'csv'"),
        (lambda: SourceConfig(kind="jsonl"), "path is required"),
        (lambda: SourceConfig(scale=0), "scale must be > 0"),
        (lambda: DataConfig(val_fraction=0.5), "data.val_fraction"),
        (lambda: DataConfig(test_fraction=-0.1), "data.test_fraction"),
        (lambda: DataConfig(max_seq_len=8), "data.max_seq_len"),
        (lambda: DataConfig(sources=[]), "data.sources is empty"),
        (lambda: ModelConfig(vocab_size=10), "model.vocab_size"),
        (lambda: PolicyConfig(temperature=0), "policy.temperature"),
        (lambda: PolicyConfig(unimax_epochs=-1), "policy.unimax_epochs"),
    ],
)
def test_section_validation(build, match: str) -> None:
    with pytest.raises(RaymixError, match=match):
        build()


def test_source_kind_suggestion() -> None:
    with pytest.raises(RaymixError, match="did you mean 'jsonl'"):
        SourceConfig(kind="jsonll", path="/x")


@pytest.mark.parametrize(
    "item, where",
    [
        ("train.lr=0", "train.lr"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("train.warmup_fraction=1", "train.warmup_fraction"),
        ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
        ("runtime.num_workers=-1", "runtime.num_workers"),
        ("runtime.cpus_per_worker=0", "runtime.cpus_per_worker"),
    ],
)
def test_train_and_runtime_ranges(item: str, where: str) -> None:
    with pytest.raises(RaymixError, match=where):
        load_config(None, [item])


def test_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(RaymixError, match="expected a mapping"):
        from_dict(RunConfig, [1, 2])


# --------------------------------------------------------------------------- flatten


def test_flatten_keeps_known_keys_as_strings() -> None:
    cfg = load_config(None, ["budget.tokens=5000", "eval.max_new_tokens=7", "tracking.run_name=myrun"])
    flat = flatten(cfg)
    assert flat["budget.tokens"] == "5000"
    assert flat["eval.max_new_tokens"] == "7"
    assert flat["tracking.run_name"] == "myrun"
    assert flat["seed"] == "0"
    assert flat["policy.name"] == "uniform"
    assert flat["budget.fraction"] == "0.01"
    assert flat["train.betas"] == "[0.9, 0.95]"
    assert flat["budget.max_epochs"] == "8.0"
    assert flat["model.pretrained"] == "null"
    assert all(isinstance(v, str) for v in flat.values())
    # every leaf of every section is there (nested dicts are flattened, lists are JSON)
    for section, value in to_dict(cfg).items():
        if isinstance(value, dict):
            for key in value:
                assert f"{section}.{key}" in flat, f"{section}.{key}"


def test_flatten_logs_mappings_as_json_and_filters_secret_names() -> None:
    cfg = load_config(None, ["policy.name=static", "policy.weights={a: 1, token_classification: 2}"])
    flat = flatten(cfg)
    # Task names inside a mapping are values, never mistaken for secret keys.
    assert json.loads(flat["policy.weights"]) == {"a": 1.0, "token_classification": 2.0}
    for name in ("hf_token", "api_key", "password", "aws_secret", "db-credentials"):
        assert is_secret_key(name), name
    for name in ("tokenizer", "max_new_tokens", "tokens", "keyword", "monkey"):
        assert not is_secret_key(name), name


def test_flatten_truncates_long_values() -> None:
    many = {f"t{i:05d}": 1.0 for i in range(2000)}
    cfg = RunConfig(policy=PolicyConfig(name="static", schedule=[[0, many]]))
    flat = flatten(cfg)
    assert len(flat["policy.schedule"]) == 6000


def test_flatten_keeps_model_tokenizer() -> None:
    cfg = load_config(None, ["model.tokenizer=gpt2"])
    assert flatten(cfg)["model.tokenizer"] == "gpt2"


# --------------------------------------------------------------------------- identity hash


def test_identity_hash_is_stable() -> None:
    h = identity_hash(RunConfig())
    assert isinstance(h, str) and len(h) == 16
    assert identity_hash(RunConfig()) == h
    assert identity_hash(load_config()) == h


@pytest.mark.parametrize(
    "override",
    [
        "runtime.use_gpu=true",
        "runtime.cpus_per_worker=2",
        "runtime.torch_threads=8",
        "runtime.parallelism=fsdp",
        "tracking.run_name=other",
        "tracking.experiment=exp2",
        "tracking.tracking_uri=http://localhost:5000",
        "data.cache_dir=/tmp/somewhere",
    ],
)
def test_identity_hash_ignores_runtime(override: str) -> None:
    assert identity_hash(load_config(None, [override])) == identity_hash(RunConfig())


def test_the_worker_count_counts_where_it_sets_the_global_batch(tmp_path) -> None:
    """Without train.global_batch_tokens a step trains micro_batch_size x
    grad_accum examples per worker: 2 workers train a batch twice that of
    one (different results; the same identity before). Local mode (0) and
    one worker train alike, so they share an identity; with a global batch
    in tokens the worker count is hardware again."""
    from raymix.config import identity_diff, to_yaml
    from raymix.driver.output import check_resumable

    def h(*overrides):
        return identity_hash(load_config(None, list(overrides)))

    assert h("runtime.num_workers=0") == h("runtime.num_workers=1")
    assert len({h("runtime.num_workers=1"), h("runtime.num_workers=2"), h("runtime.num_workers=4")}) == 3
    fixed = "train.global_batch_tokens=16384"
    assert h(fixed, "runtime.num_workers=0") == h(fixed, "runtime.num_workers=2") == h(fixed, "runtime.num_workers=8")
    # --resume on another worker count names the field and the way out.
    one, two = load_config(None, ["runtime.num_workers=1"]), load_config(None, ["runtime.num_workers=2"])
    (line,) = identity_diff(one, two)
    assert line.startswith("runtime.num_workers: 1 -> 2") and "train.global_batch_tokens" in line
    (tmp_path / "config.yaml").write_text(to_yaml(one))
    (tmp_path / "run.json").write_text(json.dumps({"identity": identity_hash(one), "mlflow_run_id": "r"}))
    with pytest.raises(RaymixError, match=r"runtime\.num_workers: 1 -> 2"):
        check_resumable(two, tmp_path)
    assert check_resumable(load_config(None, ["runtime.num_workers=0"]), tmp_path)["identity"] == identity_hash(one)
    # A run.json cut short is a named error, not a traceback.
    (tmp_path / "run.json").write_text('{"identity": "' + identity_hash(one)[:5])
    with pytest.raises(RaymixError, match=r"run.json cannot be read .*start it afresh in another --output"):
        check_resumable(one, tmp_path)
    # An elastic group changes its count mid-run: it needs the global batch.
    with pytest.raises(RaymixError, match="elastic: set train.global_batch_tokens"):
        load_config(None, ["runtime.num_workers=[1, 4]", "runtime.max_failures=3"])
    assert load_config(None, ["runtime.num_workers=[1, 4]", "runtime.max_failures=3", fixed]).runtime.elastic


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["runtime.parallelism=fdsp"], r"runtime.parallelism must be one of ddp, fsdp, got 'fdsp' \(did you mean 'fsdp'"),
        (["runtime.parallelism=fsdp", "runtime.num_workers=0"], r"runtime.parallelism=fsdp .* runtime.num_workers >= 1"),
        (["runtime.parallelism=fsdp", "policy.name=adapt"], r"policy.name=adapt .* runtime.parallelism=ddp"),
        (["runtime.parallelism=fsdp", "policy.name=gradex"], r"policy.name=gradex .* runtime.parallelism=ddp"),
    ],
)
def test_parallelism_is_validated(overrides: list, message: str) -> None:
    with pytest.raises(RaymixError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "override",
    [
        "seed=1",
        "policy.name=proportional",
        "budget.fraction=0.02",
        "model.preset=llama-small",
        "data.max_seq_len=256",
        "train.lr=0.001",
        "eval.max_new_tokens=8",
    ],
)
def test_identity_hash_changes_with_identity(override: str) -> None:
    assert identity_hash(load_config(None, [override])) != identity_hash(RunConfig())


def test_adapt_defaults_leave_other_policies_identities_unchanged() -> None:
    """Issue #13 changed ADAPT's defaults: ADAPT's identity changed, the
    others' (recorded runs, sweep resume) did not. (The hashes since the
    split rule entered every identity: cfd04137b5601627, b594ce98d5f12b9c
    and aae6ef50dbf2e903 before.)"""
    # Pinned on one worker: runs recorded there (every published sweep trains in
    # local mode) keep these; the default's 2 workers count since the worker
    # count entered the identity where it sets the global batch.
    assert identity_hash(load_config(None, ["runtime.num_workers=1"])) == "d7b40bb85ca96e1e"
    assert identity_hash(load_config(None, ["policy.name=proportional", "runtime.num_workers=1"])) == "b9fc0b7ef1d2b0c9"
    assert identity_hash(load_config(None, ["policy.name=gradex", "runtime.num_workers=1"])) == "de31fd5a22e6ebbf"
    assert identity_hash(load_config(None, ["policy.name=adapt"])) != "4c6cf66cf227e14b"
    # An ADAPT field is not part of another policy's identity.
    assert identity_hash(load_config(None, ["policy.adapt.entropy=0.3"])) == identity_hash(RunConfig())
    assert identity_hash(load_config(None, ["policy.name=adapt", "policy.adapt.entropy=0.3"])) != \
        identity_hash(load_config(None, ["policy.name=adapt"]))


def test_evaluation_bounds_per_task_counts_in_all() -> None:
    """``eval.curve_max_examples`` and ``eval.max_exact_match_prompts`` bound
    what a curve point and the exact match read in all: each task's count
    falls to the bound over the task count, never below one; at their
    defaults they leave small pools' counts and every identity as they were."""
    from raymix.config import EvalConfig

    ev = EvalConfig()
    assert [ev.curve_per_task(t) for t in (23, 128, 129, 1000, 5000)] == [8, 8, 7, 1, 1]
    assert [ev.exact_match_per_task(t) for t in (23, 32, 33, 1000, 5000)] == [32, 32, 31, 1, 1]
    # the pinned identities above hold at the defaults; set otherwise, the bounds count
    assert identity_hash(load_config(None, ["eval.curve_max_examples=1024"])) == identity_hash(RunConfig())
    for override in ("eval.curve_max_examples=100", "eval.max_exact_match_prompts=100"):
        assert identity_hash(load_config(None, [override])) != identity_hash(RunConfig())
    for field in ("curve_max_examples", "max_exact_match_prompts", "batch_size"):
        with pytest.raises(RaymixError, match=f"eval.{field} must be >= 1, got 0"):
            load_config(None, [f"eval.{field}=0"])


def test_identity_hash_does_not_mutate_config() -> None:
    cfg = load_config(None, ["data.cache_dir=/tmp/c"])
    identity_hash(cfg)
    assert cfg.data.cache_dir == "/tmp/c"
    assert to_dict(cfg)["data"]["cache_dir"] == "/tmp/c"


# --------------------------------------------------------------------------- config files


def test_missing_config_file(tmp_path: Path) -> None:
    f = tmp_path / "nope.yaml"
    with pytest.raises(RaymixError) as ei:
        load_config(f)
    assert str(f) in str(ei.value)
    assert "does not exist" in str(ei.value)


def test_config_file_not_yaml(tmp_path: Path) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("seed: [1, 2\n  policy: {\n", encoding="utf-8")
    with pytest.raises(RaymixError) as ei:
        load_config(f)
    assert str(f) in str(ei.value)
    assert "not valid YAML" in str(ei.value)


def test_config_file_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "latin.yaml"
    f.write_bytes(b"seed: 1\nname: \xff\xfe\n")
    with pytest.raises(RaymixError) as ei:
        load_config(f)
    assert str(f) in str(ei.value)


def test_config_file_top_level_not_mapping(tmp_path: Path) -> None:
    f = tmp_path / "list.yaml"
    f.write_text("- seed\n- 1\n", encoding="utf-8")
    with pytest.raises(RaymixError) as ei:
        load_config(f)
    assert str(f) in str(ei.value)
    assert "top level must be a mapping" in str(ei.value)


def test_empty_config_file_is_default(tmp_path: Path) -> None:
    f = tmp_path / "empty.yaml"
    f.write_text("", encoding="utf-8")
    assert load_config(f) == RunConfig()


def test_config_is_frozen() -> None:
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


def test_global_batch_tokens_derives_accumulation_and_leaves_identity() -> None:
    from raymix.config import effective_grad_accum

    laptop = load_config(None, ["train.global_batch_tokens=16384", "runtime.num_workers=1",
                                "train.micro_batch_size=16"])
    cluster = load_config(None, ["train.global_batch_tokens=16384", "runtime.num_workers=8",
                                 "train.micro_batch_size=8", "train.gradient_checkpointing=true"])
    assert effective_grad_accum(laptop) == 8  # 16384 / (16 x 1 x 128)
    assert effective_grad_accum(cluster) == 2  # 16384 / (8 x 8 x 128)
    assert identity_hash(laptop) == identity_hash(cluster)
    other = load_config(None, ["train.global_batch_tokens=8192"])
    assert identity_hash(other) != identity_hash(laptop)
    # Without a global batch, grad_accum is taken as given and is part of the identity.
    assert effective_grad_accum(load_config(None, ["train.grad_accum=3"])) == 3
    assert identity_hash(load_config(None, ["train.grad_accum=3"])) != identity_hash(load_config(None, []))
    with pytest.raises(RaymixError, match="train.global_batch_tokens must be >= 1"):
        load_config(None, ["train.global_batch_tokens=0"])


def test_num_workers_range_makes_the_run_elastic() -> None:
    cfg = load_config(overrides=["runtime.num_workers=[1, 4]", "runtime.max_failures=3",
                                 "train.global_batch_tokens=16384"])
    assert (cfg.runtime.min_workers, cfg.runtime.num_workers, cfg.runtime.elastic) == (1, 4, True)
    assert not load_config(overrides=["runtime.num_workers=3"]).runtime.elastic
    # Resources are not identity (with a global batch in tokens): an elastic
    # run resumes a fixed one and back.
    assert identity_hash(cfg) == identity_hash(load_config(overrides=["train.global_batch_tokens=16384"]))


@pytest.mark.parametrize("value, message", [
    ("[2, 1]", "needs 1 <= min <= max"),
    ("[0, 2]", "needs 1 <= min <= max"),
    ("[1]", "a range [min, max] of two integers"),
    ("[1, two]", "a range [min, max] of two integers"),
    ("[1, 2]", "set runtime.max_failures to N > 0"),
])
def test_bad_worker_range_is_refused_naming_the_field(value: str, message: str) -> None:
    with pytest.raises(RaymixError, match="runtime.num_workers") as e:
        load_config(overrides=[f"runtime.num_workers={value}"])  # max_failures: 0 by default
    assert message in str(e.value)


@pytest.mark.parametrize("value", [0, -1])
def test_train_poll_seconds_must_be_positive(value: float) -> None:
    with pytest.raises(RaymixError, match="runtime.train_poll_seconds must be > 0"):
        load_config(overrides=[f"runtime.train_poll_seconds={value}"])
    assert load_config(overrides=["runtime.train_poll_seconds=0.5"]).runtime.train_poll_seconds == 0.5


def test_every_policy_option_names_its_policy() -> None:
    """``POLICY_OPTIONS`` (which policy reads which option; reports label
    variants by it) covers every field of PolicyConfig, each a registered policy."""
    from raymix.config import POLICY_OPTIONS

    fields = {f.name for f in dataclasses.fields(PolicyConfig)} - {"name"}
    assert set(POLICY_OPTIONS) == fields
    assert set(POLICY_OPTIONS.values()) <= set(POLICIES)


def test_a_mapping_override_merges_into_the_section_earlier_overrides_set() -> None:
    """A space's base ``policy.adapt.every_steps: 5`` survives its grid's
    ``policy: {name: adapt}`` (it was dropped before: the mapping replaced the
    whole section); later keys win, and a value that is not a section's
    mapping still replaces."""
    cfg = load_config(None, ["policy.adapt.every_steps=5", "policy.adapt.warmup_steps=5",
                             "policy={name: adapt, adapt: {entropy: 0.5}}"])
    assert (cfg.policy.name, cfg.policy.adapt.every_steps, cfg.policy.adapt.warmup_steps,
            cfg.policy.adapt.entropy) == ("adapt", 5, 5, 0.5)
    assert load_config(None, ["policy={name: adapt, adapt: {every_steps: 7}}",
                              "policy.adapt={every_steps: 9}"]).policy.adapt.every_steps == 9
    assert load_config(None, ["policy.temperature=3.0", "policy={name: temperature, temperature: 2.0}"]
                       ).policy.temperature == 2.0


def test_adapt_ni_space_keeps_its_base_adapt_cadence() -> None:
    from raymix.sweep import load_space

    space = load_space(Path(__file__).resolve().parents[1] / "tune_spaces" / "adapt_ni.yaml")
    adapt = [c.policy.adapt for c in space.configs() if c.policy.name == "adapt"]
    assert adapt and all((a.every_steps, a.warmup_steps, a.tasks_per_step) == (5, 5, None) for a in adapt)
    assert {a.entropy for a in adapt} == {1.0, 0.5}
