"""Export round trip and validation: training model -> export dir -> reference loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from badit_serve.core.export_io import ExportError, load_export, sha256_file
from badit_serve.core.format import MANIFEST_FILE, expert_prefix
from badit_serve.core.reference import load_reference_model
from tests.support.badit_exports import trained_model
from training.adapters import (
    AdapterConfig,
    adapted_layers,
    apply_adapters,
)
from training.export import export_model, export_tensors, measure_task_shares


def _trained_model(model_dir: Path, method: str = "badit", steps: int = 3) -> torch.nn.Module:
    return trained_model(model_dir, method, steps)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
@pytest.mark.parametrize("method", ["badit", "pissa", "loramoe", "loramoe_dense"])
def test_round_trip_reproduces_training_logits(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, family: str, method: str
) -> None:
    model = _trained_model(tiny_model_dirs[family], method)
    out = export_model(model, tiny_model_dirs[family], tmp_path / "export")
    reference = load_reference_model(out)
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(42))
    torch.testing.assert_close(reference(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"][0].startswith("Badit")
    assert config["badit"]["rank"] == (8 if method == "badit" else 4)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_routing_table_records_components_and_task_shares(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model = _trained_model(tiny_model_dirs["llama"])
    shares = measure_task_shares(model, {"task_a": [[5, 6, 7, 8]], "task_b": [[9, 10, 11], [12, 13]]})
    for per_task in shares.values():
        for per_expert in per_task.values():
            assert sum(per_expert) == pytest.approx(4.0)  # each token selects top_k = 4 experts
    out = export_model(
        model, tiny_model_dirs["llama"], tmp_path / "export", task_shares=shares, dog_history=[{"step": 3}]
    )
    table = load_export(out).routing_table
    assert len(table.layers) == 2 and table.dog_history == [{"step": 3}]
    ids = sorted(c.svd_index for e in table.layers[0].experts for c in e.components)
    assert ids == list(range(32))
    assert all(e.label for e in table.layers[0].experts) and set(table.expert_labels) == {
        str(e) for e in range(8)
    }


@pytest.fixture(scope="module")
def good_export(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(
        _trained_model(tiny_model_dirs["llama"], steps=1),
        tiny_model_dirs["llama"],
        tmp_path_factory.mktemp("good") / "export",
    )


def _corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_weights(export: Path, edit) -> None:
    """Edit model.safetensors and fix the manifest entry, so only the tensor check can catch it."""
    tensors = load_file(export / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(export / "model.safetensors"))
    manifest = json.loads((export / MANIFEST_FILE).read_text())
    path = export / "model.safetensors"
    manifest["files"]["model.safetensors"] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    (export / MANIFEST_FILE).write_text(json.dumps(manifest))


def _rewrite_config(export: Path, edit) -> None:
    config = json.loads((export / "config.json").read_text())
    edit(config)
    (export / "config.json").write_text(json.dumps(config))
    manifest = json.loads((export / MANIFEST_FILE).read_text())
    path = export / "config.json"
    manifest["files"]["config.json"] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    (export / MANIFEST_FILE).write_text(json.dumps(manifest))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


PREFIX = expert_prefix("model.layers.0.mlp.gate_proj")
CORRUPTIONS = {
    "missing expert tensor": (
        lambda e: _rewrite_weights(e, lambda t: t.pop(f"{PREFIX}.lora_a")),
        f"{PREFIX}.lora_a",
    ),
    "extra expert tensor": (
        lambda e: _rewrite_weights(
            e, lambda t: t.update({"model.layers.0.mlp.badit_up.lora_a": torch.zeros(2, 2)})
        ),
        "unexpected expert tensor",
    ),
    "wrong shape": (
        lambda e: _rewrite_weights(e, lambda t: t.update({f"{PREFIX}.router": torch.zeros(3, 128)})),
        "shape",
    ),
    "wrong dtype": (
        lambda e: _rewrite_weights(
            e, lambda t: t.update({f"{PREFIX}.router": torch.zeros(8, 128, dtype=torch.int32)})
        ),
        "dtype",
    ),
    "missing base tensor": (
        lambda e: _rewrite_weights(e, lambda t: t.pop("model.norm.weight")),
        "model.norm.weight",
    ),
    "checksum mismatch": (lambda e: _flip_last_byte(e / "tokenizer.json"), "sha256 mismatch"),
    "unknown format version": (
        lambda e: _rewrite_config(e, lambda c: c["badit"].update(format_version=99)),
        "format_version=99",
    ),
    "unknown architecture": (
        lambda e: _rewrite_config(e, lambda c: c["badit"].update(base_architecture="GPT2LMHeadModel")),
        "GPT2LMHeadModel",
    ),
    "missing file": (lambda e: (e / "routing_table.json").unlink(), "routing_table.json"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_exports_are_rejected_with_a_clear_message(
    good_export: Path, tmp_path: Path, case: str
) -> None:
    corrupt, expected = CORRUPTIONS[case]
    export = _corrupt_copy(good_export, tmp_path / "export")
    corrupt(export)
    with pytest.raises(ExportError, match=expected.replace(".", r"\.")):
        load_reference_model(export)


def test_existing_out_dir_is_kept_without_force(
    good_export: Path, tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model = _trained_model(tiny_model_dirs["llama"], steps=1)
    target = tmp_path / "export"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_model(model, tiny_model_dirs["llama"], target)
    assert (target / "keep.txt").read_text() == "mine"
    export_model(model, tiny_model_dirs["llama"], target, force=True)
    assert not (target / "keep.txt").exists() and load_export(target)


def test_interrupted_export_leaves_nothing(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _trained_model(tiny_model_dirs["llama"], steps=1)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("badit_serve.core.export_io.shutil.copy2", boom)
    with pytest.raises(KeyboardInterrupt):
        export_model(model, tiny_model_dirs["llama"], tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_dense_export_of_an_untrained_adapter_reproduces_the_base_model(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from training.export import export_dense, measure_routing

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["qwen3"], dtype=torch.float32).eval()
    model = apply_adapters(
        AutoModelForCausalLM.from_pretrained(tiny_model_dirs["qwen3"], dtype=torch.float32),
        AdapterConfig(rank=4),
        seed=0,
    ).eval()
    _, mean_weights = measure_routing(model, {"t": [[5, 6, 7, 8, 9]]})
    assert all(
        sum(w) == pytest.approx(4.0) for w in mean_weights.values()
    )  # gate_scale = top_k: weights sum to 4
    dense_dir = export_dense(model, tiny_model_dirs["qwen3"], tmp_path / "dense", mean_weights)
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in dense_dir.iterdir())  # readable by other users
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    ids = torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dense(ids).logits, base(ids).logits, atol=1e-5, rtol=0)


def test_interleaved_probe_covers_every_task() -> None:
    from training.export import interleaved_probe

    prompts = {"a": [[1], [2], [3]], "b": [[10]], "c": [[20], [21]]}
    # the old probe took the first prompts in task order: [[1], [2], [3]] never reached b or c
    assert interleaved_probe(prompts, 3) == [[1], [10], [20]]
    assert interleaved_probe(prompts, 5) == [[1], [10], [20], [2], [21]]
    assert interleaved_probe(prompts, 99) == [[1], [10], [20], [2], [21], [3]]
    assert interleaved_probe({}, 4) == []


def test_dense_export_folds_experts_by_mean_weight(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """With a dense router whose weights are constant, folding is exact: dense == routed."""
    from training.export import export_dense

    config = AdapterConfig(method="loramoe_dense", rank=4, dropout=0.0)
    model = apply_adapters(
        AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float32), config, seed=0
    )
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.router.weight.zero_()  # uniform softmax: every token weighs each expert 1/8
            layer.lora_b.normal_(0, 0.05)
    model.eval()
    uniform = {name: [1 / 8] * 8 for name in adapted_layers(model)}
    dense = AutoModelForCausalLM.from_pretrained(
        export_dense(model, tiny_model_dirs["llama"], tmp_path / "dense", uniform), dtype=torch.float32
    )
    ids = torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dense(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_export_files_are_world_readable(good_export: Path) -> None:
    """safetensors >= 0.8 writes 0600; a server running as another user (the container image's) must read it."""
    assert good_export.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in good_export.iterdir()} == {
        p.name: 0o644 for p in good_export.iterdir()
    }


@pytest.mark.train
def test_export_takes_the_stored_initial_factors_instead_of_an_svd(
    tiny_model_dirs: dict[str, Path], superni_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An 8B export spent most of an hour on CPU recomputing every gate_proj SVD that the checkpoint
    already holds (A0/B0 of the delta form). Rebuilt from the stored factors, the model exports the same
    tensors, and export_run never calls the SVD."""
    from tests.support.training_runs import train_overrides
    from training.checkpoint import latest_checkpoint, load_checkpoint, restore_training_state
    from training.cli.export import export_run
    from training.config import load_config
    from training.run import build_model, run

    model_dir = tiny_model_dirs["llama"]
    extra = {"eval.enabled": "false", "adapter.dog.schedule": "every_n_steps", "adapter.dog.every_n_steps": 2}
    cfg = load_config(None, train_overrides(model_dir, superni_dir, tmp_path / "run", **extra))
    run(cfg, show_progress=False)
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    exported = []
    for stored in (None, state.adapter):
        model = build_model(cfg, model_dir, torch.device("cpu"), stored_state=stored)
        restore_training_state(state, model)
        exported.append(export_tensors(model))
    assert exported[0].keys() == exported[1].keys()
    for key, value in exported[0].items():
        assert torch.equal(exported[1][key], value), key

    def no_svd(*args: object, **kwargs: object) -> None:
        raise AssertionError("export recomputed an SVD")

    monkeypatch.setattr("training.adapters.layer.top_singular_components", no_svd)
    out = export_run(tmp_path / "run", tmp_path / "export")
    reference = load_reference_model(out)
    ids = torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    model.eval()
    torch.testing.assert_close(reference(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
