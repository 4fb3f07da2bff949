"""Tests for the task loaders: Natural Instructions, JSONL and Hugging Face datasets.

The real Natural Instructions sample is read from ``$RAYMIX_NI_SAMPLE`` (never
copied into the repository); those tests skip when it is unset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from raymix.errors import RaymixError
from raymix.tasks.hf import load_hf_dataset
from raymix.tasks.jsonl import load_jsonl
from raymix.tasks.natural_instructions import load_natural_instructions

NI_SAMPLE = os.environ.get("RAYMIX_NI_SAMPLE")
needs_sample = pytest.mark.skipif(
    not NI_SAMPLE,
    reason="set RAYMIX_NI_SAMPLE to the Natural Instructions sample directory "
    "(a directory of Natural Instructions task files) to run the real-data tests",
)


# --------------------------------------------------------------------------- NI


def ni_task(**over: object) -> dict:
    doc: dict = {
        "Definition": ["Answer yes or no."],
        "URL": float("nan"),
        "Positive Examples": [
            {"input": "Is 2 even?", "output": "yes", "explanation": "."},
            {"input": "Is 3 even?", "output": "no", "explanation": "."},
        ],
        "Instances": [
            {"id": "t1-a", "input": "Is 4 even?", "output": ["yes", "Yes"]},
            {"id": "t1-b", "input": "Is 5 even?", "output": ["no"]},
            {"id": "t1-c", "input": "Is 6 even?", "output": ["yes"]},
        ],
    }
    doc.update(over)
    return doc


def write_ni(tmp_path: Path, name: str = "task001_even", **over: object) -> Path:
    p = tmp_path / f"{name}.json"
    # json.dumps writes NaN for float('nan'), as the real files do.
    p.write_text(json.dumps(ni_task(**over), indent=1), encoding="utf-8")
    return p


def test_ni_prompt_format_and_references(tmp_path: Path) -> None:
    p = write_ni(tmp_path)
    recs = load_natural_instructions(p)
    assert [r.id for r in recs] == ["t1-a", "t1-b", "t1-c"]
    r = recs[0]
    assert r.task == "task001_even" and r.split == "train"
    assert r.prompt == "Answer yes or no.\n\nInput: Is 4 even?"
    assert r.completion == "yes" and r.references == ("yes", "Yes")

    two = load_natural_instructions(tmp_path, positive_examples=2, max_instances=2)
    assert len(two) == 2
    assert two[1].prompt == (
        "Answer yes or no.\n\nInput: Is 2 even?\nOutput: yes\n\n"
        "Input: Is 3 even?\nOutput: no\n\nInput: Is 5 even?"
    )
    # More examples than the task has: all of them are used.
    assert load_natural_instructions(p, positive_examples=9)[0].prompt == two[0].prompt


def test_ni_plain_string_definition_and_task_filter(tmp_path: Path) -> None:
    write_ni(tmp_path, Definition="Plain string.")
    write_ni(tmp_path, name="task002_other")
    recs = load_natural_instructions(tmp_path, tasks=["task002_other"])
    assert {r.task for r in recs} == {"task002_other"}
    recs = load_natural_instructions(tmp_path, tasks=["task001_even"])
    assert recs[0].prompt.startswith("Plain string.\n\nInput:")
    with pytest.raises(RaymixError, match="task999_nope") as e:
        load_natural_instructions(tmp_path, tasks=["task999_nope"])
    assert "task001_even" in str(e.value)  # lists what is available


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"Definition": []}, "Definition"),
        ({"Definition": [""]}, "Definition"),
        ({"Instances": None}, "Instances"),
        ({"Instances": []}, "zero instances"),
        ({"Instances": [{"id": "x", "output": ["a"]}]}, "'input'"),
        ({"Instances": [{"id": "x", "input": "q"}]}, "'output'"),
        ({"Instances": [{"id": "x", "input": "q", "output": []}]}, "'output'"),
    ],
)
def test_ni_structural_errors(tmp_path: Path, over: dict, needle: str) -> None:
    p = write_ni(tmp_path, **over)
    with pytest.raises(RaymixError, match=needle) as e:
        load_natural_instructions(p)
    assert p.name in str(e.value)


def test_ni_missing_definition(tmp_path: Path) -> None:
    doc = ni_task()
    del doc["Definition"]
    p = tmp_path / "task003_nodef.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(RaymixError, match="Definition") as e:
        load_natural_instructions(p)
    assert p.name in str(e.value)


def test_ni_malformed_json_names_line_and_column(tmp_path: Path) -> None:
    p = tmp_path / "task004_bad.json"
    p.write_text('{\n  "Definition": ["x"],\n  "Instances": [,]\n}\n')
    with pytest.raises(RaymixError, match=r"line 3, column \d+") as e:
        load_natural_instructions(p)
    assert p.name in str(e.value)


def test_ni_non_utf8_names_byte_offset(tmp_path: Path) -> None:
    p = tmp_path / "task005_latin1.json"
    raw = json.dumps(ni_task(Definition=["caf\u00e9"]), ensure_ascii=False).encode(
        "latin-1"
    )
    p.write_bytes(raw)
    with pytest.raises(RaymixError, match="UTF-8") as e:
        load_natural_instructions(p)
    assert p.name in str(e.value)
    offset = raw.index(b"\xe9")
    assert f"byte offset {offset}" in str(e.value)


def test_ni_empty_directory_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(RaymixError, match="task\\*.json") as e:
        load_natural_instructions(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(RaymixError, match="no such file"):
        load_natural_instructions(tmp_path / "missing")


@needs_sample
def test_ni_real_sample() -> None:
    recs = load_natural_instructions(NI_SAMPLE, positive_examples=2)
    tasks = {r.task for r in recs}
    assert len(tasks) == 6 and "task190_snli_classification" in tasks
    assert len(recs) == 6 * 121
    assert len({(r.task, r.id) for r in recs}) == len(recs)
    assert all(r.prompt.count("\nOutput: ") == 2 for r in recs)
    assert all(r.completion and r.completion == r.references[0] for r in recs)
    snli = [r for r in recs if r.task == "task190_snli_classification"]
    assert {r.completion for r in snli} <= {"E", "C", "N"}
    # task288 lists two paraphrased definitions; only the first is used.
    giga = next(r for r in recs if r.task == "task288_gigaword_summarization")
    assert "write a short summary" not in giga.prompt

    name = "task114_is_the_given_word_longest"
    few = load_natural_instructions(NI_SAMPLE, max_instances=5, tasks=[name])
    raw = json.loads((Path(NI_SAMPLE) / f"{name}.json").read_text(encoding="utf-8"))
    assert len(few) == 5
    assert few[0].id == raw["Instances"][0]["id"]
    definition, first = (
        raw["Definition"][0].strip(),
        raw["Instances"][0]["input"].strip(),
    )
    assert few[0].prompt == f"{definition}\n\nInput: {first}"


# ------------------------------------------------------------------------ JSONL


def write_lines(p: Path, lines: list[object | str]) -> Path:
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
    p.write_text(text + "\n", encoding="utf-8")
    return p


def test_jsonl_prompt_completion_and_optional_fields(tmp_path: Path) -> None:
    p = write_lines(
        tmp_path / "qa.jsonl",
        [
            {"prompt": "Q1", "completion": "A1"},
            "",
            {
                "prompt": "Q2",
                "completion": "A2",
                "id": 7,
                "split": "test",
                "references": ["A2", "a2"],
                "choices": ["A2", "B"],
                "task": "other",
            },
        ],
    )
    a, b = load_jsonl(p)
    assert (a.task, a.id, a.split, a.references) == ("qa", "qa-1", "train", ("A1",))
    assert (b.task, b.id, b.split) == ("other", "7", "test")
    assert b.references == ("A2", "a2") and b.choices == ("A2", "B")
    assert load_jsonl(p, task="mine")[0].task == "mine"


def test_jsonl_chat_rendering(tmp_path: Path) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    (r,) = load_jsonl(write_lines(tmp_path / "chat.jsonl", [{"messages": msgs}]))
    assert r.prompt == (
        "System: Be brief.\n\nUser: 2+2?\n\nAssistant: 4\n\nUser: 3+3?\n\nAssistant:"
    )
    assert r.completion == "6"


def test_jsonl_directory(tmp_path: Path) -> None:
    write_lines(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "c"}])
    write_lines(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}] * 2)
    recs = load_jsonl(tmp_path)
    assert [(r.task, r.id) for r in recs] == [("a", "a-1"), ("a", "a-2"), ("b", "b-1")]


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ('{"prompt": "p", "completion": ', "malformed JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"completion": "c"}, "'prompt'"),
        ({"prompt": "p"}, "'completion'"),
        ({"prompt": "", "completion": "c"}, "'prompt' is empty"),
        ({"prompt": "p", "completion": " "}, "'completion' is empty"),
        ({"prompt": 3, "completion": "c"}, "'prompt' must be a string"),
        ({"prompt": "p", "completion": ["c"]}, "'completion' must be a string"),
        ({"prompt": "p", "completion": "c", "split": "dev"}, "'split'"),
        ({"prompt": "p", "completion": "c", "references": "c"}, "'references'"),
        ({"prompt": "p", "completion": "c", "choices": [1]}, "'choices'"),
        ({"prompt": "p", "completion": "c", "task": 5}, "'task'"),
        ({"prompt": "p", "completion": "c", "id": 1.5}, "'id'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "last message"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "before the last"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "role"),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": ""},
                ]
            },
            "empty",
        ),
        ({"messages": [], "prompt": "p"}, "not both"),
    ],
)
def test_jsonl_errors_name_file_and_line(
    tmp_path: Path, bad: object, needle: str
) -> None:
    p = write_lines(
        tmp_path / "data.jsonl", [{"prompt": "ok", "completion": "ok"}, "", bad]
    )
    with pytest.raises(RaymixError, match=needle) as e:
        load_jsonl(p)
    assert "data.jsonl:3" in str(e.value)


def test_jsonl_non_utf8_and_empty_and_duplicates(tmp_path: Path) -> None:
    p = tmp_path / "enc.jsonl"
    p.write_bytes(
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n'
    )
    with pytest.raises(RaymixError, match="UTF-8") as e:
        load_jsonl(p)
    assert "enc.jsonl:2" in str(e.value) and "byte offset 50" in str(e.value)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(RaymixError, match="no records") as e:
        load_jsonl(empty)
    assert "empty.jsonl" in str(e.value)

    dup = write_lines(
        tmp_path / "dup.jsonl", [{"prompt": "p", "completion": "c", "id": "x"}] * 2
    )
    with pytest.raises(RaymixError, match="already used") as e:
        load_jsonl(dup)
    assert "dup.jsonl:2" in str(e.value) and "dup.jsonl:1" in str(e.value)

    sub = tmp_path / "sub"
    sub.mkdir()
    with pytest.raises(RaymixError, match="no \\*.jsonl") as e:
        load_jsonl(sub)
    assert "sub" in str(e.value)


# --------------------------------------------------------------------------- HF


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    import datasets

    d = tmp_path / "my_set"
    datasets.Dataset.from_dict(
        {
            "question": ["q0", "q1", "q2"],
            "answer": ["a0", "a1", "a2"],
            "kind": ["math", "math", "trivia"],
            "uid": [10, 11, 12],
        }
    ).save_to_disk(str(d))
    return d


def test_hf_save_to_disk(saved: Path) -> None:
    recs = load_hf_dataset(
        str(saved), prompt_column="question", completion_column="answer"
    )
    r = recs[0]
    assert (r.task, r.id, r.prompt, r.completion, r.split) == (
        "my_set",
        "my_set-train-0",
        "q0",
        "a0",
        "train",
    )
    recs = load_hf_dataset(
        str(saved),
        prompt_column="question",
        completion_column="answer",
        task_column="kind",
        id_column="uid",
        limit=2,
    )
    assert [(r.task, r.id) for r in recs] == [("math", "10"), ("math", "11")]
    assert (
        load_hf_dataset(str(saved), "train", "question", "answer", task="t")[2].task
        == "t"
    )


def test_hf_dataset_dict_split(tmp_path: Path) -> None:
    import datasets

    d = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"prompt": ["p"], "completion": ["c"]}),
            "validation": datasets.Dataset.from_dict(
                {"prompt": ["vp"], "completion": [["vc", "VC"]]}
            ),
        }
    ).save_to_disk(str(d))
    (r,) = load_hf_dataset(str(d), split="validation")
    assert (r.prompt, r.completion, r.references, r.split) == (
        "vp",
        "vc",
        ("vc", "VC"),
        "train",
    )
    with pytest.raises(RaymixError, match="no split 'test'") as e:
        load_hf_dataset(str(d), split="test")
    assert "validation" in str(e.value)


def test_hf_local_data_files(tmp_path: Path) -> None:
    jl = write_lines(tmp_path / "rows.jsonl", [{"prompt": "p", "completion": "c"}] * 2)
    recs = load_hf_dataset(str(jl))
    assert len(recs) == 2 and recs[0].task == "rows" and recs[1].id == "rows-train-1"
    csv = tmp_path / "table.csv"
    csv.write_text("prompt,completion\nhello,world\n")
    (r,) = load_hf_dataset(str(csv), split="test")
    assert (r.task, r.prompt, r.completion, r.split) == (
        "table",
        "hello",
        "world",
        "train",
    )


def test_hf_errors(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(RaymixError, match="'prompt' not found") as e:
        load_hf_dataset(str(saved))
    assert "question" in str(e.value) and "answer" in str(e.value)
    with pytest.raises(RaymixError, match="'nope' not found"):
        load_hf_dataset(str(saved), "train", "question", "answer", task_column="nope")
    with pytest.raises(RaymixError, match="must hold strings"):
        load_hf_dataset(str(saved), "train", "uid", "answer")
    with pytest.raises(RaymixError, match="no such file"):
        load_hf_dataset(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(RaymixError, match="unsupported"):
        load_hf_dataset(str(tmp_path / "x.txt"))


def test_hf_hub_offline_is_wrapped() -> None:
    with pytest.raises(RaymixError, match="raymix-nonexistent/tiny") as e:
        load_hf_dataset("raymix-nonexistent/tiny")
    assert "hub" in str(e.value) and "HF_DATASETS_OFFLINE" in str(e.value)


def test_hub_dataset_revision_reaches_the_loader_and_the_keys(monkeypatch) -> None:
    """``data.sources[].revision`` is what the hub is asked for, and part of
    the shard cache key and the run's identity (unset, the identity is as
    before the field existed); ``id_column`` names the instance ids."""
    import raymix.tasks.hf as hf
    from raymix.config import DataConfig, SourceConfig, identity_hash, load_config
    from raymix.data import load_pool, source_fingerprint

    asked = []

    def fake_open(name, split, revision):
        import datasets

        asked.append((name, split, revision))
        return datasets.Dataset.from_list([{"prompt": f"p{i}", "completion": f"c{i}", "uid": f"u{9 - i}"}
                                           for i in range(10)])

    monkeypatch.setattr(hf, "_open", fake_open)
    src = SourceConfig(kind="hf", path="org/data", task="t", revision="0123abc")
    assert len(load_pool(DataConfig(sources=[src]))) == 10 and asked == [("org/data", "train", "0123abc")]
    # ids from a column, when named: the split follows the instances, not the row order
    keyed = load_pool(DataConfig(sources=[SourceConfig(kind="hf", path="org/data", task="t", id_column="uid")]))
    assert {r.id for r in keyed} == {f"u{i}" for i in range(10)}
    unpinned = SourceConfig(kind="hf", path="org/data", task="t")
    assert source_fingerprint(src, "s") != source_fingerprint(unpinned, "s")
    pinned, plain = (load_config(None, [f"data.sources=[{{kind: hf, path: org/data, task: t{r}}}]"])
                     for r in (", revision: 0123abc", ""))
    assert identity_hash(pinned) != identity_hash(plain)
