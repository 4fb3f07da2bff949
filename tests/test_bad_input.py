"""Bad input is refused with a message naming the file, field or flag, before
any training time is spent (no Ray needed for these)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raymix.config import load_config
from raymix.driver.setup import budget_tokens, prepare_model_and_data
from raymix.errors import RaymixError


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


def _word_tokenizer(tmp_path: Path, special: dict) -> str:
    """A word-level tokenizer built here (no hub), with the given special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", *special.values(), *(f"w{i}" for i in range(50)), "Answer", ":", "\n"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special)
    out = tmp_path / ("tok-" + "-".join(special) or "none")
    fast.save_pretrained(str(out))
    return str(out)


def test_tokenizer_without_pad_or_eos_is_refused(tmp_path: Path) -> None:
    from raymix.models import load_tokenizer

    bare = _word_tokenizer(tmp_path, {})
    with pytest.raises(RaymixError, match=r"model.tokenizer: tokenizer .* has neither a pad nor an eos token"):
        load_tokenizer(bare)
    # With an eos token, padding uses it (pad positions are masked anyway).
    tok = load_tokenizer(_word_tokenizer(tmp_path, {"eos_token": "</s>"}))
    assert tok.pad_token == "</s>"


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path: Path) -> None:
    """A prompt longer than the context keeps its end (the question sits
    there); an answer that cannot fit drops the example; both are counted."""
    import numpy as np

    from raymix.tokenizing import Tokenize

    tok_dir = _word_tokenizer(tmp_path, {"eos_token": "</s>", "pad_token": "<pad>"})
    tokenize = Tokenize(tok_dir, "plain", max_seq_len=24)
    long_prompt = " ".join(f"w{i % 50}" for i in range(60)) + " w7"
    batch = {"task_idx": np.array([0, 0, 0]), "shard": np.array([0, 0, 0]), "split": np.array(["train"] * 3), "id": np.array(["a", "b", "c"]),
             "prompt": np.array(["w1 w2", long_prompt, "w1"]),
             "completion": np.array(["w3", "w4", " ".join(["w5"] * 40)]),
             "references": [["w3"], ["w4"], ["w5"]]}
    table = tokenize(batch).to_pydict()
    assert table["status"] == ["ok", "truncated", "dropped"]
    assert all(n <= 24 for n in table["n_tokens"])
    assert table["n_tokens"][2] == 0
    # The truncated prompt keeps its last word, right before the answer.
    ids = table["input_ids"][1]
    from raymix.models import load_tokenizer

    text = load_tokenizer(tok_dir).decode(ids[: table["prompt_len"][1]])
    assert "w7" in text.split()[-4:]


def test_tokenize_ids_are_the_tokenizers_own(tmp_path: Path) -> None:
    """Tokenize reads a fast tokenizer's Rust batch encoder directly: the ids
    equal ``tok(texts)["input_ids"]`` (no special tokens added), for a
    byte-level BPE trained here on text with non-ASCII characters, runs of
    spaces and newlines, and the special tokens' own strings inside it."""
    from raymix.models import BOS, EOS, PAD, train_tokenizer
    from raymix.tokenizing import Tokenize

    texts = ["Translate: caf\u00e9 -> cafe", "  two  spaces\nand a newline\n\n", f"x {EOS} y {PAD}{BOS}",
             "\u4e2d\u6587 and \U0001f600 emoji", "Answer: 42", " leading space", ""]
    tok, path = train_tokenizer(lambda: texts * 20, 300, tmp_path / "cache", "ids-test")
    tokenize = Tokenize(path, "plain", max_seq_len=64)
    assert tokenize.tok.is_fast
    assert tokenize._ids(texts) == tok(texts, add_special_tokens=False)["input_ids"]


def test_tokenize_without_transformers_gives_the_same_rows(tmp_path: Path) -> None:
    """Where no chat template applies, tokenize_args hands the actors the
    fast tokenizer's Rust encoder (serialised) with its bos and eos ids:
    every column of every row equals what Tokenize gives with transformers'
    tokenizer loaded, truncated and dropped rows included. With a chat
    template the actors load the tokenizer (it renders the prompts)."""
    import numpy as np

    from raymix.models import BOS, EOS, PAD, train_tokenizer
    from raymix.tokenizing import Tokenize, tokenize_args

    texts = ["Translate: caf\u00e9 -> cafe", "  two  spaces\nand a newline\n\n", f"x {EOS} y {PAD}{BOS}",
             "\u4e2d\u6587 and \U0001f600 emoji", "Answer: 42", " leading space", ""]
    _, path = train_tokenizer(lambda: texts * 20, 300, tmp_path / "cache", "rows-test")
    args = tokenize_args(path, "plain", 24)
    assert set(args["encoder"]) == {"json", "bos", "eos"} and args["encoder"]["eos"] is not None
    light, full = Tokenize(**args), Tokenize(path, "plain", 24)
    assert light.tok is None and full.tok is not None
    n = len(texts)
    batch = {"task_idx": np.arange(n), "shard": np.zeros(n, dtype=int), "split": np.array(["train"] * n),
             "id": np.array([str(i) for i in range(n)]), "prompt": np.array(texts, dtype=object),
             "completion": np.array(texts[::-1][:-1] + [" ".join(["Answer: 42"] * 12)], dtype=object),
             "references": [["r"]] * n}
    got, want = light(batch).to_pydict(), full(batch).to_pydict()
    assert got == want
    assert {"ok", "dropped"} <= set(got["status"])

    chat = _word_tokenizer(tmp_path / "chat", {"eos_token": "</s>", "pad_token": "<pad>",
                                                "chat_template": "{{ messages[0]['content'] }}"})
    assert "encoder" not in tokenize_args(chat, "auto", 24)


def test_unreachable_mlflow_server_fails_before_training(tmp_path: Path) -> None:
    from raymix.driver import run

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    cfg = load_config(None, ["tracking.tracking_uri=http://127.0.0.1:9"])
    with pytest.raises(RaymixError, match="MLflow tracking server http://127.0.0.1:9 is unreachable"):
        run(cfg, out)
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (out / "summary.json").exists() and not (out / "run.json").exists()
    assert not (out / "ray").exists()  # no training started


def test_output_on_a_read_only_filesystem_is_refused(tmp_path: Path, monkeypatch) -> None:
    """Root ignores permission bits, so the filesystem's answer is simulated:
    the probe write fails as on a read-only mount. Nothing is left behind."""
    import errno

    from raymix.driver.output import prepare_output

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "write_text", read_only)
    with pytest.raises(RaymixError, match=r"--output .*out cannot be written \(a read-only filesystem"):
        prepare_output(load_config(None, []), tmp_path / "out", False, "")
    monkeypatch.undo()
    assert not (tmp_path / "out" / "config.yaml").exists()


def test_output_on_a_full_filesystem_is_refused(tmp_path: Path, monkeypatch) -> None:
    import shutil
    from collections import namedtuple

    from raymix.driver.output import prepare_output

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(RaymixError, match=r"--output .*only 1 MiB free"):
        prepare_output(load_config(None, []), tmp_path / "out", False, "")
    assert not (tmp_path / "out" / "config.yaml").exists()


def test_more_workers_than_a_local_ray_can_place_is_refused(monkeypatch) -> None:
    import ray

    from raymix.driver.setup import check_worker_resources

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    cfg = load_config(None, ["runtime.num_workers=64", "runtime.cpus_per_worker=1"])
    with pytest.raises(RaymixError, match=r"runtime.num_workers=64 x runtime.cpus_per_worker=1.0 = 64 CPU\(s\), "
                                          r"but the local Ray has 2 CPU"):
        check_worker_resources(cfg)
    check_worker_resources(load_config(None, ["runtime.num_workers=2", "runtime.cpus_per_worker=0.5"]))
    # On a cluster the autoscaler may add nodes: it says what it waits for instead.
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    check_worker_resources(cfg)


def test_sweep_refuses_trials_whose_workers_cannot_be_placed_beside_the_trial(tmp_path: Path, monkeypatch) -> None:
    """Two workers of 1 CPU fill a 2-CPU local Ray, and the Tune trial that
    starts them holds its own share: the group could never start. Refused
    before any trial starts (it used to wait for ever), naming the fields."""
    import ray

    import raymix.driver.setup as setup
    from raymix.sweep import load_space, run_sweep

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(setup, "init_ray", lambda cfg: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    space = load_space(Path(__file__).resolve().parents[1] / "tune_spaces" / "smoke.yaml")
    with pytest.raises(RaymixError, match=r"runtime.num_workers=2 x runtime.cpus_per_worker=1.0 \+ 0.05 for its "
                                          r"Tune trial = 2.05 CPU\(s\), but the local Ray has 2 CPU"):
        run_sweep(space, ["runtime.num_workers=2", "runtime.cpus_per_worker=1"], tmp_path / "sweep", resume=False)
    assert not (tmp_path / "sweep" / "trials").exists()


def test_sweep_resume_that_changes_trial_identity_is_refused(tmp_path: Path) -> None:
    """``--resume`` with a ``--set`` that changes results is refused before
    anything is written; a runtime-only ``--set`` passes the check."""
    import json

    from raymix.sweep import check_resume_identity, load_space, run_sweep

    space = load_space(Path(__file__).resolve().parents[1] / "tune_spaces" / "smoke.yaml")
    out = tmp_path / "sweep"
    out.mkdir()
    state = {"space": space.name, "extra": ["budget.tokens=4000"]}
    (out / "sweep.json").write_text(json.dumps(state))
    with pytest.raises(RaymixError, match=r"--resume: --set \['budget.tokens=4000', 'budget.tokens=5000'\] "
                                          r"changes the identity"):
        run_sweep(space, ["budget.tokens=5000"], out, resume=True)
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json"]
    assert json.loads((out / "sweep.json").read_text()) == state
    same = ["budget.tokens=4000", "runtime.num_cpus=1"]
    check_resume_identity(space, state["extra"], same, space.configs(same))
    # The worker count sets the global batch (no train.global_batch_tokens): it counts.
    wider = ["budget.tokens=4000", "runtime.num_workers=4"]
    with pytest.raises(RaymixError, match="not runtime.num_workers where train.global_batch_tokens is null"):
        check_resume_identity(space, state["extra"], wider, space.configs(wider))


def test_tokenizer_directory_missing_files_names_file_and_field(tmp_path: Path) -> None:
    """A tokenizer directory copied incompletely is refused naming the file
    it lacks and the field that points at it, not with transformers' error
    (no vocabulary) or a misleading one (no special tokens: no pad token)."""
    from raymix.models import load_tokenizer

    full = Path(_word_tokenizer(tmp_path, {"eos_token": "</s>", "pad_token": "<pad>"}))
    no_vocab = tmp_path / "no-vocab"
    no_config = tmp_path / "no-config"
    no_vocab.mkdir()
    no_config.mkdir()
    (no_vocab / "tokenizer_config.json").write_bytes((full / "tokenizer_config.json").read_bytes())
    (no_config / "tokenizer.json").write_bytes((full / "tokenizer.json").read_bytes())
    with pytest.raises(RaymixError, match=r"^model.tokenizer: tokenizer directory .*no-vocab is missing tokenizer.json"):
        load_tokenizer(str(no_vocab))
    with pytest.raises(RaymixError, match=r"^model.pretrained: .*no-config is missing tokenizer_config.json"):
        load_tokenizer(str(no_config), "model.pretrained")
    (no_vocab / "vocab.json").write_text("{}")  # half of a byte-level BPE vocabulary
    with pytest.raises(RaymixError, match=r"no-vocab is missing merges.txt"):
        load_tokenizer(str(no_vocab))
    # Through a run's configuration, before anything is tokenised.
    path = _jsonl(tmp_path, '{"prompt": "w1", "completion": "w2"}\n' * 3)
    cfg = load_config(None, [f"data.sources=[{{kind: jsonl, path: {path}}}]", f"model.tokenizer={no_config}"])
    with pytest.raises(RaymixError, match=r"model.tokenizer: .*missing tokenizer_config.json"):
        prepare_model_and_data(cfg, tmp_path / "out")
    assert load_tokenizer(str(full)).pad_token == "<pad>"  # the complete one loads


def _cached_pool(tmp_path: Path):
    """A small pool tokenised into a fresh cache (needs Ray)."""
    lines = "".join(f'{{"prompt": "w{i % 50} w1", "completion": "w{(i * 7) % 50}", "task": "t{i % 2}"}}\n'
                    for i in range(40))
    path = _jsonl(tmp_path, lines)
    tok = _word_tokenizer(tmp_path, {"eos_token": "</s>", "pad_token": "<pad>"})
    return load_config(None, [f"data.sources=[{{kind: jsonl, path: {path}}}]", f"model.tokenizer={tok}",
                              f"data.cache_dir={tmp_path / 'cache'}", "runtime.data_concurrency=1"])


def _read_all(pool) -> int:
    import pyarrow.dataset as pads

    return pads.dataset([str(f) for f in Path(pool.root).rglob("*.parquet")], format="parquet").count_rows()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_corrupted_or_truncated_shard_is_detected_and_rebuilt(ray_local, tmp_path: Path, capsys) -> None:
    """A Parquet shard damaged in the cache (a truncated copy, a flipped
    byte) is found by its size and SHA-256 in the cache's manifest and the
    entry rebuilt from the sources, with a message naming the file; the
    sources are untouched and the rebuilt pool is the same."""
    cfg = _cached_pool(tmp_path)
    _, _, pool, _ = prepare_model_and_data(cfg, tmp_path / "out")
    assert not pool.cache_hit
    root = Path(pool.root)
    rows = _read_all(pool)
    shards = sorted(root.rglob("*.parquet"))
    assert shards and rows == 40
    source = Path(cfg.data.sources[0].path).read_bytes()

    # Truncated: half of the file.
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])
    _, _, again, _ = prepare_model_and_data(cfg, tmp_path / "out2")
    err = capsys.readouterr().err
    rel = str(shards[0].relative_to(root))
    assert not again.cache_hit and again.root == pool.root and again.stats == pool.stats
    assert f"pool cache {root}: file {rel} has {len(data) // 2} bytes, {len(data)} were written" in err
    assert "rebuilding it" in err
    assert _read_all(again) == rows

    # Corrupted in place: same size, one byte changed.
    shard = sorted(root.rglob("*.parquet"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    _, _, third, _ = prepare_model_and_data(cfg, tmp_path / "out3")
    assert not third.cache_hit and "SHA-256 mismatch" in capsys.readouterr().err
    assert _read_all(third) == rows
    # ... and a clean entry is a hit again, with no message.
    _, _, hit, _ = prepare_model_and_data(cfg, tmp_path / "out4")
    assert hit.cache_hit and "rebuilding" not in capsys.readouterr().err
    assert Path(cfg.data.sources[0].path).read_bytes() == source  # nothing lost


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_cache_of_an_older_format_is_rebuilt_with_a_message(ray_local, tmp_path: Path, capsys) -> None:
    """A cache entry without a manifest (written by raymix before format 3)
    or with another format version is rebuilt in place, saying why."""
    import json

    from raymix.shard_cache import MANIFEST, SHARD_FORMAT_VERSION

    cfg = _cached_pool(tmp_path)
    _, _, pool, _ = prepare_model_and_data(cfg, tmp_path / "out")
    manifest = Path(pool.root) / MANIFEST
    assert json.loads(manifest.read_text())["format"] == SHARD_FORMAT_VERSION

    manifest.unlink()  # as raymix wrote entries before the manifest existed
    _, _, again, _ = prepare_model_and_data(cfg, tmp_path / "out2")
    assert not again.cache_hit and again.stats == pool.stats
    assert f"written by an older raymix (no {MANIFEST}" in capsys.readouterr().err

    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "format": SHARD_FORMAT_VERSION - 1}))
    _, _, third, _ = prepare_model_and_data(cfg, tmp_path / "out3")
    assert not third.cache_hit
    assert f"format version {SHARD_FORMAT_VERSION - 1} in {MANIFEST}" in capsys.readouterr().err
    _, _, hit, _ = prepare_model_and_data(cfg, tmp_path / "out4")
    assert hit.cache_hit and _read_all(hit) == 40


def test_local_model_paths_reach_workers_absolute(tmp_path: Path, monkeypatch) -> None:
    """Ray Train workers run in directories of their own: a relative
    ``model.pretrained`` (``--output runs/x`` in the GPU check) is handed to
    them absolute, else transformers takes it for a hub id there."""
    from raymix.models import local_or_hub

    (tmp_path / "runs" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert local_or_hub("runs/model") == str(tmp_path.resolve() / "runs" / "model")
    assert local_or_hub("./runs/model/") == str(tmp_path.resolve() / "runs" / "model")
    assert local_or_hub("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"  # not here: a hub id, left as it is


@pytest.mark.parametrize("override, field", [
    ("seed=-1", "seed"),
    ("data.max_test=-1", "data.max_test"),
    ("data.max_val=-2", "data.max_val"),
    ("data.sources=[{kind: synthetic, seed: -1}]", "data.sources[].seed"),
    ("data.sources=[{kind: jsonl, path: x.jsonl, task_sizes: {a: -5}}]", "data.sources[].task_sizes"),
    ("data.sources=[{kind: natural_instructions, path: d, max_instances: 0}]", "data.sources[].max_instances"),
    ("policy.gradex.seed=-1", "policy.gradex.seed"),
    ("policy.aioli.seed=-1", "policy.aioli.seed"),
])
def test_negative_counts_and_seeds_are_refused_naming_the_field(override: str, field: str) -> None:
    """Refused when the config is read, not after tokenising (a negative
    seed reached numpy's generator in the workers; a negative task size
    random.sample; a negative max_test emptied every test split silently)."""
    with pytest.raises(RaymixError, match=field.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_config(None, [override])
