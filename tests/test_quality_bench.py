"""benchmarks/quality.py: suite planning, metrics aggregation, and a resumable end-to-end run on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import quality  # noqa: E402

from training.config import load_config  # noqa: E402


def _suite(**extra) -> quality.Suite:
    tree = {
        "description": "test",
        "base": {"train": {"epochs": 1}},
        "methods": {"lora": {"adapter": {"method": "lora"}}, "badit": {"adapter": {"method": "badit"}}},
        "seeds": [0, 1],
    }
    return quality.Suite.model_validate({**tree, **extra})


def test_every_shipped_suite_resolves_to_valid_run_configs(tmp_path: Path) -> None:
    for path in sorted(quality.SUITES.glob("*.yaml")):
        suite = quality.load_suite(path.stem)
        for spec in quality.plan(suite, None):
            tree = quality.run_tree(suite, spec, tmp_path / spec.key, tmp_path)
            cfg_file = tmp_path / f"{path.stem}-{spec.key}.yaml"
            cfg_file.write_text(yaml.safe_dump(tree))
            cfg = load_config(cfg_file)
            assert cfg.train.mode == spec.mode and cfg.train.seed == spec.seed
            assert (cfg.eval.single_run is not None) == (suite.forward and spec.mode != "single")


def test_plan_puts_single_runs_before_the_runs_that_read_them() -> None:
    specs = quality.plan(_suite(), ["badit"])
    assert [s.key for s in specs] == [
        "badit-single-s0",
        "badit-mixed-s0",
        "badit-sequential-s0",
        "badit-single-s1",
        "badit-mixed-s1",
        "badit-sequential-s1",
    ]
    with pytest.raises(SystemExit, match="unknown method"):
        quality.plan(_suite(), ["pissa"])


def test_config_hash_ignores_paths_but_not_settings(tmp_path: Path) -> None:
    suite = _suite()
    spec = quality.RunSpec("lora", "mixed", 0)
    a = quality.run_tree(suite, spec, tmp_path / "a" / spec.key, tmp_path / "a")
    b = quality.run_tree(suite, spec, tmp_path / "b" / spec.key, tmp_path / "b")
    assert quality.config_hash(a) == quality.config_hash(b)
    c = quality.run_tree(_suite(base={"train": {"epochs": 2}}), spec, tmp_path / spec.key, tmp_path)
    assert quality.config_hash(a) != quality.config_hash(c)


def test_step_seconds_uses_consecutive_steps_within_a_stage(tmp_path: Path) -> None:
    lines = [
        {"event": "step", "stage": 0, "step": 1, "time": 10.0},
        {"event": "regroup", "stage": 0, "step": 1, "time": 10.5},
        {"event": "step", "stage": 0, "step": 2, "time": 12.0},
        {"event": "eval", "stage": 0, "time": 50.0},
        {"event": "step", "stage": 1, "step": 3, "time": 60.0},
        {"event": "step", "stage": 1, "step": 4, "time": 64.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    assert quality.step_seconds(path) == pytest.approx(3.0)  # (2 + 4) / 2; the eval gap is not a step


def _record(method: str, mode: str, seed: int, matrix: list[list[float]]) -> dict:
    tasks = ["t0", "t1"]
    rouge = sum(matrix[-1]) / len(tasks)
    return {
        "method": method,
        "mode": mode,
        "seed": seed,
        "rouge_l": rouge,
        "tasks": tasks,
        "matrix": matrix,
        "final": dict(zip(tasks, matrix[-1], strict=True)),
        "step_s": 1.0 + seed,
        "peak_rss_mib": 100.0 * (seed + 1),
    }


def test_summarize_mean_and_std_over_seeds_with_metrics_from_the_matrix() -> None:
    records = {
        "lora-single-s0": _record("lora", "single", 0, [[50.0, 30.0]]),
        "lora-single-s1": _record("lora", "single", 1, [[50.0, 30.0]]),
        "lora-mixed-s0": _record("lora", "mixed", 0, [[40.0, 40.0]]),
        "lora-mixed-s1": _record("lora", "mixed", 1, [[44.0, 44.0]]),
        "lora-sequential-s0": _record("lora", "sequential", 0, [[60.0, 0.0], [40.0, 50.0]]),
    }
    (row,) = quality.summarize(_suite(), records)
    assert row["rouge_mixed"][0] == pytest.approx(42.0)
    assert row["rouge_mixed"][1] == pytest.approx(2**0.5 * 2)
    assert row["forward_mixed"][0] == pytest.approx(2.0)  # 42 - mean(50, 30)
    assert row["rouge_seq"] == (45.0, None)
    # forward (sequential): mean(a[i][i] - single[i]) = ((60 - 50) + (50 - 30)) / 2
    assert row["forward_seq"][0] == pytest.approx(15.0)
    assert row["forget"][0] is not None and row["backward"][0] is not None
    assert row["step_s"] == pytest.approx(4 / 3) and row["peak_rss_mib"] == 200.0
    table = quality.markdown_table("t", _suite(), [row], {"description": "here"})
    # authors' scorer: Backward = mean over all T of a[T-1][i] - a[i][i]; Forget = peak over earlier stages - final
    assert (
        "| lora | 42.00 ± 2.83 | 2.00 ± 2.83 | 45.00 | 15.00 | -10.00 | 20.00 | 1.33 | 200 | 0,1 |" in table
    )


def test_forward_reference_shares_one_single_run_per_seed() -> None:
    suite = _suite(forward_reference="lora", seeds=[0])
    keys = [s.key for s in quality.plan(suite, None)]
    assert keys == [
        "lora-single-s0",
        "lora-mixed-s0",
        "lora-sequential-s0",
        "badit-mixed-s0",
        "badit-sequential-s0",
    ]
    assert quality.single_spec(suite, quality.RunSpec("badit", "mixed", 0)).key == "lora-single-s0"


@pytest.mark.slow
@pytest.mark.train
def test_suite_runs_resumably_and_second_call_only_reprints(
    tiny_model_dirs, superni_dir, tmp_path, monkeypatch, capsys
) -> None:
    suite_file = tmp_path / "tiny.yaml"
    suite = {
        "description": "tiny",
        "base": {
            "model": {"name_or_path": str(tiny_model_dirs["llama"])},
            "data": {
                "superni_dir": str(superni_dir),
                "tasks": ["task363_sst2_polarity_classification", "task875_emotion_classification"],
                "max_train_per_task": 4,
                "max_test_per_task": 2,
                "max_length": 128,
                "max_target_tokens": 4,
            },
            "adapter": {"rank": 2},
            "train": {"max_steps": 2, "batch_size": 2},
            "eval": {"max_new_tokens": 3},
            "output": {"log_every": 1},
        },
        "methods": {"lora": {"adapter": {"method": "lora"}}},
        "seeds": [0],
    }
    suite_file.write_text(yaml.safe_dump(suite))
    args = [
        "--suite",
        str(suite_file),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--out-dir",
        str(tmp_path / "res"),
    ]
    assert quality.main(args) == 0
    result = json.loads((tmp_path / "res" / "quality-tiny.json").read_text())
    assert set(result["runs"]) == {"lora-single-s0", "lora-mixed-s0", "lora-sequential-s0"}
    (row,) = result["rows"]
    assert row["rouge_mixed"][0] is not None and row["forward_mixed"][0] is not None
    assert row["backward"][0] is not None and row["step_s"] > 0 and row["peak_rss_mib"] > 0
    assert (tmp_path / "res" / "quality-tiny.png").is_file()
    table = (tmp_path / "res" / "quality-tiny.md").read_text()
    capsys.readouterr()

    def no_run(*_args, **_kwargs):
        raise AssertionError("a complete run was started again")

    monkeypatch.setattr(quality, "execute", no_run)
    assert quality.main(args) == 0
    assert capsys.readouterr().out.strip() == table.strip()
