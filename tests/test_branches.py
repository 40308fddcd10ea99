"""O-LoRA and GainLoRA: the math of their per-task branches and the invariants each method promises."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from badit_serve.core.export_io import ExportError
from training.adapters import AdapterConfig, adapted_layers, apply_adapters, layer_spec
from training.adapters.branches import (
    GatedBranchLinear,
    branch_rows,
    extend_basis,
    gain_gate,
    orthogonality_loss,
    project_out,
    top_direction,
)
from training.checkpoint import load_checkpoint
from training.cli.export import main as export_main
from training.config import load_config
from training.run import RunError, run

TASKS = ["task363_sst2_polarity_classification", "task875_emotion_classification"]


def test_orthogonality_loss_is_zero_for_orthogonal_branches_and_l1_otherwise() -> None:
    q = torch.eye(16)[torch.randperm(16)[:6]] * torch.rand(6, 1)  # (6, 16) exactly orthogonal rows
    assert orthogonality_loss(q, branch=1, rank=2) == 0 and orthogonality_loss(q, branch=2, rank=2) == 0
    r = torch.linalg.qr(torch.randn(16, 6)).Q.t()  # orthonormal up to rounding
    assert orthogonality_loss(r, branch=2, rank=2) < 1e-5
    a = torch.eye(16)[:6].clone()
    a[2] += 0.5 * a[0]  # branch 1 leans on branch 0
    assert orthogonality_loss(a, branch=1, rank=2) == pytest.approx(0.5, abs=1e-6)
    assert (
        orthogonality_loss(torch.randn(6, 16), branch=0, rank=2) == 0
    )  # nothing earlier to be orthogonal to


def test_gain_gate_is_zero_exactly_for_inputs_orthogonal_to_the_key() -> None:
    keys = torch.randn(3, 8)
    x = project_out(torch.randn(5, 8), torch.nn.functional.normalize(keys[1:2], dim=-1).t())  # (5, 8) ⊥ k_1
    gate = gain_gate(x, keys)  # (5, 3)
    assert gate.shape == (5, 3) and torch.all(gate >= 0) and torch.all(gate < 1)
    assert gate[:, 1].abs().max() < 1e-6
    parallel = gain_gate(keys[2:3] * 3.0, keys)[0, 2]  # cos = 1
    assert float(parallel) == pytest.approx(float(2 * torch.sigmoid(torch.tensor(4.0)) - 1), abs=1e-6)


def test_gpm_basis_captures_the_energy_asked_for_and_new_keys_avoid_it() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=gen, dtype=torch.float64) * torch.linspace(
        5, 0.1, 12, dtype=torch.float64
    )
    gram = x.t() @ x  # (12, 12)
    basis = extend_basis(torch.zeros(12, 0, dtype=torch.float64), gram, 0.9)
    assert torch.allclose(basis.t() @ basis, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-8)
    captured = torch.trace(basis.t() @ gram @ basis) / torch.trace(gram)
    assert captured >= 0.9
    smaller = basis[:, :-1]
    assert torch.trace(smaller.t() @ gram @ smaller) / torch.trace(gram) < 0.9  # the fewest directions
    assert extend_basis(basis, gram, 0.9).shape == basis.shape  # already enough: nothing added
    key = top_direction(gram, basis)
    assert (basis.t() @ key).abs().max() < 1e-8 and key.norm() == pytest.approx(1.0)
    y = x @ basis @ basis.t()  # inputs inside the earlier tasks' subspace
    assert gain_gate(y.float(), key[None].float()).max() < 1e-5


def test_layer_specs_of_the_branch_methods() -> None:
    spec = layer_spec(AdapterConfig(method="o-lora", rank=4, branches={"count": 3}))
    assert (spec.num_experts, spec.rank, spec.branch_rank, spec.router, spec.branching) == (
        1,
        12,
        4,
        "none",
        "sum",
    )
    assert spec.scaling == 1.0  # alpha defaults to the per-branch rank: each branch has s = 1 as LoRA
    spec = layer_spec(AdapterConfig(method="gainlora", rank=4, branches={"count": 3}))
    assert (spec.num_experts, spec.top_k, spec.rank, spec.router, spec.branching) == (
        3,
        3,
        4,
        "dense",
        "gated",
    )
    with pytest.raises(ValueError, match="branches.count"):
        AdapterConfig(method="o-lora", num_experts=3)
    assert layer_spec(AdapterConfig(method="olora")).init == "olora"


def _cfg(model_dir: Path, superni_dir: Path, out: Path, method: str, mode: str, **extra: object):
    overrides = {
        "model.name_or_path": str(model_dir),
        "data.superni_dir": str(superni_dir),
        "data.tasks": "[" + ", ".join(TASKS) + "]",
        "data.max_train_per_task": 6,
        "data.max_test_per_task": 2,
        "data.max_length": 128,
        "data.max_target_tokens": 4,
        "adapter.method": method,
        "adapter.rank": 2,
        "adapter.dropout": 0.0,
        "adapter.branches.count": 2,
        "train.mode": mode,
        "train.task_order": "[" + ", ".join(TASKS) + "]",
        "train.batch_size": 2,
        "train.max_steps": 3,
        "train.lr": 0.01,
        "eval.enabled": "false",
        "eval.max_new_tokens": 4,
        "output.dir": str(out),
        **extra,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def _stage_states(run_dir: Path) -> list[dict[str, torch.Tensor]]:
    """Adapter state after each stage (the stage-end checkpoints, oldest first)."""
    steps = sorted(run_dir.glob("checkpoints/step-*"), key=lambda p: int(p.name.split("-")[1]))
    return [load_checkpoint(p).adapter for p in steps]


@pytest.mark.train
@pytest.mark.parametrize("method", ["o-lora", "gainlora"])
def test_later_stage_leaves_earlier_branches_untouched(
    tiny_model_dirs, superni_dir, tmp_path, method
) -> None:
    out = tmp_path / "run"
    run(_cfg(tiny_model_dirs["llama"], superni_dir, out, method, "sequential", **{"train.weight_decay": 0.1}))
    first, second = _stage_states(out)
    rows0, rows1 = branch_rows(0, 2), branch_rows(1, 2)
    for name in [k.removesuffix(".lora_a") for k in first if k.endswith(".lora_a")]:
        a0, a1, b0, b1 = (
            first[f"{name}.lora_a"],
            second[f"{name}.lora_a"],
            first[f"{name}.lora_b"],
            second[f"{name}.lora_b"],
        )
        assert torch.equal(a0[rows0], a1[rows0]) and torch.equal(
            b0[:, rows0], b1[:, rows0]
        )  # frozen, bitwise
        assert not torch.equal(b0[:, rows1], b1[:, rows1])  # the second branch trained in stage 2
        assert b0[:, rows1].abs().max() == 0  # ... and not before
        assert int(first[f"{name}.branches_done"]) == 1 and int(second[f"{name}.branches_done"]) == 2
        if method == "gainlora":
            k0, k1 = first[f"{name}.router.weight"], second[f"{name}.router.weight"]
            assert torch.equal(k0[0], k1[0])
            m0 = int(first[f"{name}.gate_basis_rank"])
            basis0 = first[f"{name}.gate_basis"][:, :m0]
            assert 0 < m0 < basis0.shape[0]
            assert torch.equal(second[f"{name}.gate_basis"][:, :m0], basis0)  # GPM only appends
            # The second task's gate is 0 on every input inside the first task's input subspace.
            x = torch.randn(64, m0) @ basis0.t()  # (64, d_in)
            assert gain_gate(x, k1)[:, 1].abs().max() < 1e-4
            assert gain_gate(x, k1)[:, 0].abs().mean() > 1e-3  # while the first task's gate is not


@pytest.mark.train
def test_too_few_branches_for_the_stages_is_refused_before_training(
    tiny_model_dirs, superni_dir, tmp_path
) -> None:
    cfg = _cfg(
        tiny_model_dirs["llama"],
        superni_dir,
        tmp_path / "r",
        "o-lora",
        "sequential",
        **{"adapter.branches.count": 1},
    )
    with pytest.raises(RunError, match="branches.count"):
        run(cfg)
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.train
def test_o_lora_in_mixed_mode_is_lora(tiny_model_dirs, superni_dir, tmp_path) -> None:
    """One stage trains one branch with no earlier branch to be orthogonal to: exactly LoRA."""
    states = {}
    for method in ("lora", "o-lora"):
        out = tmp_path / method
        run(
            _cfg(tiny_model_dirs["qwen3"], superni_dir, out, method, "mixed", **{"adapter.branches.count": 1})
        )
        states[method] = _stage_states(out)[-1]
    for key, value in states["lora"].items():
        torch.testing.assert_close(states["o-lora"][key], value, atol=0, rtol=0)


@pytest.mark.train
def test_o_lora_exports_as_one_lora_and_gainlora_export_is_refused(
    tiny_model_dirs, superni_dir, tmp_path, capsys
) -> None:
    for method in ("o-lora", "gainlora"):
        out = tmp_path / method
        run(_cfg(tiny_model_dirs["llama"], superni_dir, out, method, "sequential", **{"train.max_steps": 1}))
        code = export_main([str(out), str(tmp_path / f"{method}-export")])
        if method == "o-lora":
            assert code == 0 and (tmp_path / "o-lora-export" / "badit_manifest.json").is_file()
        else:
            assert code != 0 and "cannot be exported" in capsys.readouterr().err
            assert not (tmp_path / "gainlora-export").exists()


def test_gated_layers_are_not_servable() -> None:
    assert GatedBranchLinear.servable is False
    model = torch.nn.Sequential()
    model.add_module("gate_proj", torch.nn.Linear(8, 8))
    apply_adapters(model, AdapterConfig(method="gainlora", rank=2, branches={"count": 2}))
    from training.export import check_exportable

    with pytest.raises(ExportError, match="gainlora"):
        check_exportable(model)
    assert isinstance(next(iter(adapted_layers(model).values())), GatedBranchLinear)
