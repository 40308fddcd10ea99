"""badit-train on a tiny model: every method through the CLI, kill-and-resume equality, sequential mode."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.support.training_runs import RESUME_OVERRIDES, TASKS, InterruptAfter, train_cli, train_overrides
from training.checkpoint import latest_checkpoint, load_checkpoint
from training.cli.export import main as export_main
from training.config import load_config
from training.run import RunError, run

pytestmark = pytest.mark.train


@pytest.mark.parametrize(
    "method", ["badit", "lora", "pissa", "loramoe", "loramoe_dense", "badit_no_dog", "badit_no_bad"]
)
def test_every_method_trains_evaluates_and_exports(
    tiny_model_dirs, superni_dir, tmp_path, method, capsys
) -> None:
    out = tmp_path / "run"
    extra = {
        "adapter.method": method,
        "adapter.dog.schedule": "every_n_steps",
        "adapter.dog.every_n_steps": 2,
    }
    assert train_cli(train_overrides(tiny_model_dirs["llama"], superni_dir, out, **extra)) == 0
    assert "Rouge-L" in capsys.readouterr().out
    for name in ("config.yaml", "metrics.jsonl", "scores.json", "report.md", "plots/loss.png"):
        assert (out / name).is_file(), name
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["final"]) == set(TASKS[:2]) and len(scores["matrix"]) == 1
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    regroups = [e for e in events if e["event"] == "regroup"]
    assert len(regroups) == (1 if method in ("badit", "badit_no_bad") else 0)
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    dense = ["--dense"] if method in ("badit", "loramoe_dense") else []
    assert export_main([str(out), str(tmp_path / "export"), *dense]) == 0
    assert (tmp_path / "export" / "badit_manifest.json").is_file()
    assert (tmp_path / "export-dense" / "model.safetensors").is_file() == bool(dense)
    if dense:  # KL on prompts from both tasks; Rouge-L of the routed and the dense model side by side
        err = capsys.readouterr().err
        assert "nats/token on 4 prompts from 2 tasks" in err
        assert re.search(r"Rouge-L routed \d+\.\d\d vs dense \d+\.\d\d on 4 test prompts of 2 tasks", err)


def test_run_dir_with_results_needs_force(tiny_model_dirs, superni_dir, tmp_path) -> None:
    overrides = train_overrides(
        tiny_model_dirs["llama"], superni_dir, tmp_path / "run", **{"eval.enabled": "false"}
    )
    assert train_cli(overrides) == 0
    with pytest.raises(RunError, match="--force"):
        run(load_config(None, overrides), tmp_path / "run", show_progress=False)
    assert train_cli(overrides, "--force") == 0


def test_killed_run_resumes_to_identical_weights(tiny_model_dirs, superni_dir, tmp_path) -> None:
    extra = {**RESUME_OVERRIDES, "train.grad_accum": 2}
    whole = load_config(
        None, train_overrides(tiny_model_dirs["qwen3"], superni_dir, tmp_path / "whole", **extra)
    )
    run(whole, show_progress=False)
    killed = load_config(
        None, train_overrides(tiny_model_dirs["qwen3"], superni_dir, tmp_path / "killed", **extra)
    )
    with pytest.raises(KeyboardInterrupt):
        run(killed, show_progress=False, hooks=[InterruptAfter(3)])
    assert load_checkpoint(latest_checkpoint(tmp_path / "killed")).progress.global_step == 3
    run(killed, resume=True, show_progress=False)
    a = load_checkpoint(latest_checkpoint(tmp_path / "whole")).adapter
    b = load_checkpoint(latest_checkpoint(tmp_path / "killed")).adapter
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)


def test_sequential_run_killed_mid_stage_resumes_to_identical_weights(
    tiny_model_dirs, superni_dir, tmp_path
) -> None:
    """The checkpoint resumed from is used once: later stages continue from the trained adapters (a bug
    restored the old checkpoint again at the next stage boundary)."""
    extra = {
        "train.mode": "sequential",
        "train.task_order": "[" + ", ".join(TASKS[:2]) + "]",
        "train.max_steps": 3,
        "output.checkpoint_every": 1,
        "adapter.dropout": 0.0,
        "eval.enabled": "false",
    }
    model = tiny_model_dirs["llama"]
    whole = load_config(None, train_overrides(model, superni_dir, tmp_path / "whole", **extra))
    run(whole, show_progress=False)
    killed = load_config(None, train_overrides(model, superni_dir, tmp_path / "killed", **extra))
    with pytest.raises(KeyboardInterrupt):
        run(killed, show_progress=False, hooks=[InterruptAfter(2)])
    run(killed, resume=True, show_progress=False)
    a = load_checkpoint(latest_checkpoint(tmp_path / "whole"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "killed"))
    assert b.progress.global_step == a.progress.global_step == 6
    for key in a.adapter:
        torch.testing.assert_close(b.adapter[key], a.adapter[key], atol=1e-6, rtol=0, msg=key)


def test_sequential_mode_evaluates_every_task_after_each_stage(
    tiny_model_dirs, superni_dir, tmp_path
) -> None:
    extra = {
        "train.mode": "sequential",
        "data.tasks": "[" + ", ".join(TASKS) + "]",
        "train.task_order": "[" + ", ".join(reversed(TASKS)) + "]",
        "train.max_steps": 1,
    }
    cfg = load_config(
        None, train_overrides(tiny_model_dirs["gemma2"], superni_dir, tmp_path / "run", **extra)
    )
    scores = run(cfg, show_progress=False)
    assert scores["tasks"] == list(reversed(TASKS))
    assert len(scores["matrix"]) == 3 and all(len(row) == 3 and None not in row for row in scores["matrix"])
    assert set(scores["continual"]) >= {"rouge", "forget_rate", "backward"}
    preds = (tmp_path / "run" / "predictions" / "stage-02.jsonl").read_text().splitlines()
    assert len(preds) == 3 * 2


def test_sequential_dog_signal_restarts_at_each_task(tiny_model_dirs, superni_dir, tmp_path) -> None:
    """6 examples, batch 2: 3 steps per epoch, 2 epochs per stage. epoch_first_half regroups after step 3
    of each stage only; steps 4-6 of task 1 accumulate signal that no regroup uses, and task 2's regroup
    must not see it (3 signal steps, not 6)."""
    extra = {
        "train.mode": "sequential",
        "train.task_order": "[" + ", ".join(TASKS[:2]) + "]",
        "train.max_steps": "",
        "train.epochs": 2,
        "adapter.dog.schedule": "epoch_first_half",
        "eval.enabled": "false",
    }
    cfg = load_config(None, train_overrides(tiny_model_dirs["qwen3"], superni_dir, tmp_path / "run", **extra))
    run(cfg, show_progress=False)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    regroups = [e for e in events if e["event"] == "regroup"]
    assert [(e["stage"], e["step"]) for e in regroups] == [(0, 3), (1, 9)]
    for event in regroups:
        assert {layer["signal_steps"] for layer in event["layers"]} == {3}


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_match_one_process(
    tiny_llama_default_tokenizer_dir, superni_dir, tmp_path
) -> None:
    """DDP (gloo, 2 processes) computes the same global-batch gradients: same weights, same regroups."""
    import subprocess
    import sys

    extra = {
        "train.max_steps": 4,
        "adapter.dropout": 0.0,
        "eval.enabled": "false",
        "train.batch_size": 4,
        "adapter.dog.schedule": "every_n_steps",
        "adapter.dog.every_n_steps": 2,
    }
    single = load_config(
        None, train_overrides(tiny_llama_default_tokenizer_dir, superni_dir, tmp_path / "one", **extra)
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each rank (OMP_NUM_THREADS=1): identical SVD initialisation
    try:
        run(single, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "training.cli.train",
        "--no-progress",
    ]
    for item in train_overrides(tiny_llama_default_tokenizer_dir, superni_dir, tmp_path / "ddp", **extra):
        args += ["--set", item]
    proc = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_checkpoint(latest_checkpoint(tmp_path / "one")).adapter
    b = load_checkpoint(latest_checkpoint(tmp_path / "ddp")).adapter
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)
        if key.endswith("component_ids"):
            assert torch.equal(a[key], b[key])


def test_single_mode_feeds_forward_transfer(tiny_model_dirs, superni_dir, tmp_path) -> None:
    single_cfg = load_config(
        None,
        train_overrides(
            tiny_model_dirs["llama"],
            superni_dir,
            tmp_path / "single",
            **{"train.mode": "single", "train.max_steps": 1},
        ),
    )
    single = run(single_cfg, show_progress=False)
    assert (
        single["mode"] == "single" and len(single["matrix"]) == 2 and set(single["final"]) == set(TASKS[:2])
    )
    mixed_cfg = load_config(
        None,
        train_overrides(
            tiny_model_dirs["llama"],
            superni_dir,
            tmp_path / "mixed",
            **{"eval.single_run": str(tmp_path / "single")},
        ),
    )
    mixed = run(mixed_cfg, show_progress=False)
    expected = sum(mixed["final"][t]["rouge_l"] - single["final"][t]["rouge_l"] for t in TASKS[:2]) / 2
    assert mixed["continual"]["forward"] == pytest.approx(expected)
    bad = load_config(
        None,
        train_overrides(
            tiny_model_dirs["llama"],
            superni_dir,
            tmp_path / "bad",
            **{"eval.single_run": str(tmp_path / "mixed")},
        ),
    )
    with pytest.raises(RunError, match="not 'single'"):
        run(bad, show_progress=False)
