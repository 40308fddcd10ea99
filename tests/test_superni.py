"""SuperNI loading, prompt building / truncation, collation and `badit-data stats`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from training.cli.data import main as data_main
from training.config import DataConfig
from training.data import (
    IGNORE_INDEX,
    DataError,
    Instance,
    Task,
    TrainExample,
    build_prompt,
    choose_reference,
    collate_prompts,
    collate_train,
    encode,
    encode_eval_prompt,
    encode_train,
    list_tasks,
    load_raw_task,
    load_task,
    load_tasks,
)
from training.data.stats import percentile

DEFINITION = "Answer the question with one word."


def inst(uid: str, text: str = "What is 2+2?", output: Any = ("four",)) -> dict[str, Any]:
    return {"id": uid, "input": text, "output": list(output) if isinstance(output, tuple) else output}


def write_task(
    root: Path, name: str, train: list[dict[str, Any]], test: list[dict[str, Any]], **extra: Any
) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, instances in (("train", train), ("test", test)):
        doc = {"Definition": [DEFINITION], "Positive Examples": [], "Instances": instances, **extra}
        (folder / f"{split}.json").write_text(json.dumps(doc))
    return folder


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(default_model_dir)


def make_task(train: list[Instance] | None = None, definition: str = DEFINITION) -> Task:
    return Task("taskX", definition, train or [], [], Path("taskX"))


# ------------------------------------------------------------------------------------------------ loading


def test_load_task_parses_and_truncates_first_n(tmp_path: Path) -> None:
    train = [inst(f"t-{i}", f"q{i} ", output=f" a{i} ") for i in range(5)]
    write_task(tmp_path, "taskA", train, [inst("e-0"), inst("e-1", output=("x", "y"))])
    write_task(tmp_path, "taskB", [inst("b-0")], [inst("b-1")])
    (tmp_path / "not_a_task").mkdir()
    assert list_tasks(tmp_path) == ["taskA", "taskB"]
    task = load_task(tmp_path, "taskA", max_train=3, max_test=1)
    assert [i.id for i in task.train] == ["t-0", "t-1", "t-2"]
    assert task.train[1] == Instance("taskA", "t-1", "q1", ("a1",))  # string output -> 1-tuple, stripped
    assert [i.id for i in task.test] == ["e-0"]
    assert task.definition == DEFINITION and task.source == tmp_path / "taskA"
    full = load_task(tmp_path, "taskA")
    assert len(full.train) == 5 and full.test[1].references == ("x", "y")
    cfg = DataConfig(superni_dir=tmp_path, tasks=["taskB", "taskA"], max_train_per_task=2)
    assert [(t.name, len(t.train)) for t in load_tasks(cfg)] == [("taskB", 1), ("taskA", 2)]


def test_max_train_by_task_overrides_the_per_task_count_and_names_unknown_tasks(tmp_path: Path) -> None:
    write_task(tmp_path, "taskA", [inst(f"a-{i}") for i in range(5)], [inst("ea")])
    write_task(tmp_path, "taskB", [inst(f"b-{i}") for i in range(5)], [inst("eb")])
    cfg = DataConfig(
        superni_dir=tmp_path, tasks=["taskA", "taskB"], max_train_per_task=2, max_train_by_task={"taskB": 4}
    )
    assert [(t.name, len(t.train)) for t in load_tasks(cfg)] == [("taskA", 2), ("taskB", 4)]
    with pytest.raises(
        DataError, match=r"max_train_by_task names taskC, taskD: no such task in .*available: taskA"
    ):
        load_tasks(cfg.model_copy(update={"max_train_by_task": {"taskD": 1, "taskC": 4, "taskB": 3}}))
    with pytest.raises(DataError, match="max_train_by_task names taskC"):
        load_tasks(cfg.model_copy(update={"tasks": None, "max_train_by_task": {"taskC": 4}}))


def test_max_train_by_task_ignores_tasks_not_run_with_a_warning(tmp_path: Path) -> None:
    """A cap for a task of the directory that the run leaves out (e.g. set by a base config for another task
    list) is unused, not wrong: `data.tasks` decides what runs, and a warning says what was ignored."""
    for name in ("taskA", "taskB"):
        write_task(tmp_path, name, [inst(f"{name}-{i}") for i in range(5)], [inst(f"e{name}")])
    cfg = DataConfig(
        superni_dir=tmp_path, tasks=["taskA"], max_train_per_task=2, max_train_by_task={"taskB": 4}
    )
    with pytest.warns(UserWarning, match="ignoring data.max_train_by_task for taskB, not in data.tasks"):
        assert [(t.name, len(t.train)) for t in load_tasks(cfg)] == [("taskA", 2)]
    with pytest.raises(ValueError, match="greater than 0"):
        DataConfig(superni_dir=tmp_path, max_train_by_task={"taskA": 0})


def test_missing_dir_and_missing_task_list_available(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        list_tasks(tmp_path / "nowhere")
    write_task(tmp_path, "task001_alpha", [inst("a")], [inst("b")])
    write_task(tmp_path, "task002_beta", [inst("c")], [inst("d")])
    with pytest.raises(DataError) as err:
        load_task(tmp_path, "task999_gamma")
    msg = str(err.value)
    assert str(tmp_path) in msg and "task999_gamma" in msg
    assert "task001_alpha" in msg and "task002_beta" in msg


def test_malformed_json_names_file_and_position(tmp_path: Path) -> None:
    folder = write_task(tmp_path, "taskA", [inst("a")], [inst("b")])
    (folder / "test.json").write_text('{"Definition": ["d"],\n "Instances": [}')
    with pytest.raises(DataError, match=r"test\.json: invalid JSON at line 2 column"):
        load_task(tmp_path, "taskA")


@pytest.mark.parametrize("definition", [None, [], [" "], ""])
def test_missing_or_empty_definition(tmp_path: Path, definition: Any) -> None:
    folder = write_task(tmp_path, "taskA", [inst("a")], [inst("b")])
    doc = json.loads((folder / "train.json").read_text())
    if definition is None:
        del doc["Definition"]
    else:
        doc["Definition"] = definition
    (folder / "train.json").write_text(json.dumps(doc))
    with pytest.raises(DataError) as err:
        load_task(tmp_path, "taskA")
    assert str(folder / "train.json") in str(err.value) and "Definition" in str(err.value)


@pytest.mark.parametrize("output", ["", [], ["  ", ""]])
def test_empty_output_errors_or_is_skipped(tmp_path: Path, output: Any) -> None:
    folder = write_task(
        tmp_path, "taskA", [inst("ok-1"), inst("bad-7", output=output), inst("ok-2")], [inst("e")]
    )
    with pytest.raises(DataError) as err:
        load_task(tmp_path, "taskA", on_empty="error")
    assert str(folder / "train.json") in str(err.value) and "bad-7" in str(err.value)
    task = load_task(tmp_path, "taskA")  # default: dropped and recorded
    assert [i.id for i in task.train] == ["ok-1", "ok-2"] and task.skipped_train == ("bad-7",)
    assert load_task(tmp_path, "taskA", max_train=1).skipped_train == ()  # beyond the first N


def test_blank_references_dropped_from_list(tmp_path: Path) -> None:
    write_task(tmp_path, "taskA", [inst("a", output=["", "yes", "  "])], [inst("b")])
    assert load_task(tmp_path, "taskA").train[0].references == ("yes",)


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ({"id": "no-out-3", "input": "x"}, "no-out-3"),
        ({"id": "num-ref-4", "input": "x", "output": ["a", 5]}, "num-ref-4"),
        ({"id": "dict-out", "input": "x", "output": {"a": 1}}, "dict-out"),
        ({"id": "no-input", "output": ["a"]}, "no-input"),
        ({"input": "x", "output": ["a"]}, "#1"),
        ({"id": "a", "input": "dup", "output": ["a"]}, "'a'"),
    ],
)
def test_malformed_instance_names_file_and_id(tmp_path: Path, entry: dict[str, Any], where: str) -> None:
    folder = write_task(tmp_path, "taskA", [inst("a"), entry], [inst("b")])
    with pytest.raises(DataError) as err:
        load_task(tmp_path, "taskA", on_empty="skip")
    assert str(folder / "train.json") in str(err.value) and where in str(err.value)


def test_train_test_overlap_rejected(tmp_path: Path) -> None:
    write_task(tmp_path, "taskA", [inst("a"), inst("b")], [inst("b")])
    with pytest.raises(DataError, match=r"test\.json.*'b'"):
        load_task(tmp_path, "taskA")


def test_raw_task_split_is_disjoint_ordered_and_sized(tmp_path: Path) -> None:
    path = tmp_path / "task999_raw_example.json"
    instances = [inst(f"r-{i}", f"in {i}", output=[f"out {i}"]) for i in range(20)]
    instances[3]["output"] = []
    path.write_text(json.dumps({"Definition": ["Do it."], "Instances": instances}))
    task = load_raw_task(path, max_train=10, max_test=5)
    assert task.name == "task999_raw_example" and task.definition == "Do it."
    assert [i.id for i in task.test] == ["r-0", "r-1", "r-2", "r-4"] and task.skipped_test == ("r-3",)
    assert [i.id for i in task.train] == [f"r-{i}" for i in range(5, 15)]
    rest = load_raw_task(path, max_train=None, max_test=5)
    assert [i.id for i in rest.train] == [f"r-{i}" for i in range(5, 20)]
    assert not {i.id for i in rest.train} & {i.id for i in rest.test}


def test_shared_set_counts(superni_dir: Path) -> None:
    tasks = load_tasks(DataConfig(superni_dir=superni_dir))
    assert len(tasks) == 15
    assert sum(len(t.train) + len(t.skipped_train) for t in tasks) == 11_741
    assert sum(len(t.test) + len(t.skipped_test) for t in tasks) == 1_197
    skipped = {
        t.name: len(t.skipped_train) + len(t.skipped_test) for t in tasks if t.skipped_train or t.skipped_test
    }
    assert skipped == {"task511_reddit_tifu_long_text_summarization": 6}
    assert all(i.references and all(r.strip() for r in i.references) for t in tasks for i in t.train + t.test)


# ------------------------------------------------------------------------------------------------ prompts


def test_raw_prompt_format_exact(tokenizer: PreTrainedTokenizerBase) -> None:
    text = build_prompt(tokenizer, "Translate.", "Hallo", "raw")
    assert text == "Definition: Translate.\n\nNow complete the following example -\nInput: Hallo\nOutput: "


def test_chat_prompt_keeps_default_system_turn(tokenizer: PreTrainedTokenizerBase) -> None:
    text = build_prompt(tokenizer, "Translate.", "Hallo", "chat")
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nTranslate.\n\nHallo<|im_end|>\n<|im_start|>assistant\n")


def _encoding(fmt: str, max_length: int, max_target_tokens: int, reference_seed: int) -> DataConfig:
    """The prompt-encoding settings of a DataConfig."""
    return DataConfig(
        prompt_format=fmt,  # type: ignore[arg-type]
        max_length=max_length,
        max_target_tokens=max_target_tokens,
        reference_seed=reference_seed,
    )


@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_labels_mask_exactly_the_prompt(tokenizer: PreTrainedTokenizerBase, fmt: str) -> None:
    instance = Instance("taskX", "x-1", "What is two plus two?", ("four, of course",))
    ex = encode_train(tokenizer, make_task(), instance, _encoding(fmt, 256, 50, 0))
    prompt = encode(tokenizer, build_prompt(tokenizer, DEFINITION, instance.input, fmt))  # type: ignore[arg-type]
    n = len(prompt)
    assert ex.input_ids[:n] == prompt and ex.labels[:n] == [IGNORE_INDEX] * n
    assert ex.labels[n:] == ex.input_ids[n:] and IGNORE_INDEX not in ex.labels[n:]
    assert tokenizer.decode(ex.labels[n:]) == "four, of course<|im_end|>"
    assert ex.labels[-1] == tokenizer.eos_token_id == 2
    assert ex.truncated_input_tokens == 0 and ex.reference_index == 0


def test_long_answer_cut_with_eos_last(tokenizer: PreTrainedTokenizerBase) -> None:
    answer = "one two three four five six seven eight nine ten"
    ex = encode_train(
        tokenizer, make_task(), Instance("taskX", "x", "Count.", (answer,)), _encoding("chat", 256, 5, 0)
    )
    response = [t for t in ex.labels if t != IGNORE_INDEX]
    assert len(response) == 5 and response[-1] == tokenizer.eos_token_id
    assert response[:4] == encode(tokenizer, answer)[:4]


@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_overlong_input_cut_at_its_end(tokenizer: PreTrainedTokenizerBase, fmt: str) -> None:
    definition = "Summarize the story below in one sentence, keeping the names."
    text = "START of the story. " + " ".join(f"word{i}" for i in range(800)) + " THE END"
    instance = Instance("taskX", "long-1", text, ("A short summary.",))
    task = make_task(definition=definition)
    ex = encode_train(tokenizer, task, instance, _encoding(fmt, 200, 50, 0))
    assert 190 <= len(ex.input_ids) <= 200  # fits, and not cut far more than needed
    response = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(response) == "A short summary.<|im_end|>"
    prompt_text = tokenizer.decode(ex.input_ids[: len(ex.input_ids) - len(response)])
    assert definition in prompt_text and "START of the story. word0 word1" in prompt_text
    assert "THE END" not in prompt_text and ex.truncated_input_tokens > 0
    kept = prompt_text.split(definition + "\n\n" if fmt == "chat" else "Input: ")[1]
    kept = kept.split("<|im_end|>")[0] if fmt == "chat" else kept.split("\nOutput: ")[0]
    assert text.startswith(kept)
    assert len(encode(tokenizer, kept)) + ex.truncated_input_tokens == len(encode(tokenizer, text))
    prompt = encode_eval_prompt(tokenizer, task, instance, fmt, 200, 30)  # type: ignore[arg-type]
    assert 160 <= len(prompt) <= 170 and definition in tokenizer.decode(prompt)


@pytest.mark.parametrize("max_length", range(100, 106))
def test_input_cut_keeps_whole_characters_and_fills_budget(
    tokenizer: PreTrainedTokenizerBase, max_length: int
) -> None:
    text = "\U0001f600" * 300  # each emoji is 3 byte-level tokens: a cut may only fall between characters
    per_char = len(encode(tokenizer, text)) // 300
    assert per_char > 1
    ex = encode_train(
        tokenizer,
        make_task(),
        Instance("taskX", "emoji", text, ("ok",)),
        _encoding("chat", max_length, 10, 0),
    )
    assert max_length - per_char < len(ex.input_ids) <= max_length
    assert ex.truncated_input_tokens % per_char == 0 and "\ufffd" not in tokenizer.decode(ex.input_ids)


def test_eval_prompt_uncut_when_it_fits(tokenizer: PreTrainedTokenizerBase) -> None:
    instance = Instance("taskX", "x", "Hallo", ("hi",))
    prompt = encode_eval_prompt(tokenizer, make_task(), instance, "chat", 1024, 50)
    assert prompt == encode(tokenizer, build_prompt(tokenizer, DEFINITION, "Hallo", "chat"))


def test_prompt_that_cannot_fit_raises(tokenizer: PreTrainedTokenizerBase) -> None:
    task = make_task(definition="A very long instruction. " * 40)
    instance = Instance("taskX", "x-9", "input", ("answer",))
    with pytest.raises(DataError, match=r"'taskX'.*'x-9'.*max_length 64"):
        encode_train(tokenizer, task, instance, _encoding("chat", 64, 10, 0))
    with pytest.raises(DataError, match=r"max_new_tokens > max_length 64"):
        encode_eval_prompt(tokenizer, task, instance, "raw", 64, 10)


def test_reference_choice_seeded_stable_in_range(tokenizer: PreTrainedTokenizerBase) -> None:
    refs = ("alpha", "beta", "gamma", "delta", "epsilon")
    instances = [Instance("taskX", f"id-{i}", "q", refs) for i in range(40)]
    picks = [choose_reference(i, 7) for i in instances]
    assert all(0 <= p < len(refs) for p in picks) and len(set(picks)) > 1
    assert [choose_reference(i, 7) for i in reversed(instances)] == picks[::-1]  # order-independent
    assert [choose_reference(i, 8) for i in instances] != picks  # the seed matters
    ex = encode_train(tokenizer, make_task(), instances[3], _encoding("chat", 256, 50, 7))
    assert ex.reference_index == picks[3]
    response = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(response) == refs[picks[3]] + "<|im_end|>"
    assert choose_reference(Instance("taskX", "one", "q", ("only",)), 7) == 0


# ------------------------------------------------------------------------------------------------ collate


def test_collate_train_pads_right() -> None:
    a = TrainExample("t", "a", [5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8], 0, 0)
    b = TrainExample("t", "b", [9, 10], [IGNORE_INDEX, 10], 0, 0)
    batch = collate_train([a, b], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_prompts_pads_left() -> None:
    batch = collate_prompts([[5, 6, 7], [8]], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [2, 2, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


# ------------------------------------------------------------------------------------------------ stats


def test_percentile_nearest_rank() -> None:
    values = list(range(1, 101))
    assert [percentile(values, q) for q in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert [percentile([30, 10, 20], q) for q in (50, 90)] == [20, 30]
    assert percentile([7], 50) == 7 and percentile([], 50) == 0


def test_stats_cli_error_on_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        data_main(["stats", "--data", str(tmp_path / "missing")]) == 2
    )  # invalid input (README: exit codes)
    err = capsys.readouterr().err
    assert err.startswith("badit-data: error:") and "missing" in err


def test_stats_cli_on_small_set(
    tmp_path: Path, default_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_task(
        tmp_path / "data",
        "taskA",
        [inst("a", output=("one", "two three")), inst("b", output="")],
        [inst("c")],
    )
    out = tmp_path / "stats.json"
    rc = data_main(
        ["stats", "--data", str(tmp_path / "data"), "--model", str(default_model_dir), "--json", str(out)]
    )
    assert rc == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total"))
    assert total.split()[1:4] == ["2", "1", "1"]  # train (with the blank one), test, empty
    stats = json.loads(out.read_text())
    assert stats["total"]["response"]["max"] == len(
        encode(AutoTokenizer.from_pretrained(default_model_dir), "two three")
    )


@pytest.mark.slow
def test_stats_cli_on_shared_set(superni_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert data_main(["stats", "--data", str(superni_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("task") and not line.startswith("task ") for line in lines) == 15
    total = next(line for line in lines if line.startswith("total")).split()
    assert total[1:4] == ["11,741", "1,197", "6"]
