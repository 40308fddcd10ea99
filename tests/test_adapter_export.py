"""Adapter-only export: same logits as the full export over the shared base, refusals named clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from badit_serve.core.adapter import (
    ADAPTER_INFO_FILE,
    ADAPTER_WEIGHTS_FILE,
    load_adapter,
    peft_name,
)
from badit_serve.core.export_io import ExportError, write_manifest
from badit_serve.core.reference import load_reference_adapter, load_reference_model
from tests.support.badit_exports import trained_model
from tests.support.tiny_models import build_tiny_model
from training.export import export_adapter, export_model


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


@pytest.mark.parametrize("method", ["badit", "loramoe"])
def test_adapter_over_base_matches_full_export(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, method: str
) -> None:
    base = tiny_model_dirs["llama"]
    model = trained_model(base, method)
    full = export_model(model, base, tmp_path / "full")
    adapter = export_adapter(model, base, tmp_path / "adapter")
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(7))
    expected = load_reference_model(full)(ids).logits
    torch.testing.assert_close(load_reference_adapter(base, adapter)(ids).logits, expected, atol=0, rtol=0)
    assert _dir_bytes(adapter) < _dir_bytes(full) / 4
    peft = json.loads((adapter / "adapter_config.json").read_text())
    block = load_adapter(adapter).block
    assert peft["target_modules"] == ["gate_proj"] and peft["r"] == block.rank
    assert peft["lora_alpha"] / peft["r"] == pytest.approx(block.scaling * block.gate_scale)


@pytest.mark.parametrize("method", ["pissa"])
def test_methods_that_change_the_base_are_refused(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, method: str
) -> None:
    model = trained_model(tiny_model_dirs["llama"], method)
    with pytest.raises(ExportError, match=r"residual is W - s\*B0\*A0, not W"):
        export_adapter(model, tiny_model_dirs["llama"], tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapter")
    return export_adapter(trained_model(tiny_model_dirs["llama"]), tiny_model_dirs["llama"], root / "a")


def test_wrong_base_is_refused(adapter_dir: Path, default_model_dir: Path, tmp_path: Path) -> None:
    other = build_tiny_model("llama", default_model_dir, tmp_path / "other", seed=1)
    with pytest.raises(ExportError, match="trained on a different base model"):
        load_reference_adapter(other, adapter_dir)


def test_corrupted_adapter_is_refused(adapter_dir: Path, tmp_path: Path) -> None:
    bad = Path(shutil.copytree(adapter_dir, tmp_path / "bad"))
    tensors = load_file(str(bad / ADAPTER_WEIGHTS_FILE))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(bad / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(ExportError, match="sha256 mismatch"):
        load_adapter(bad)


def test_wrong_shapes_are_refused(adapter_dir: Path, tmp_path: Path) -> None:
    bad = Path(shutil.copytree(adapter_dir, tmp_path / "bad"))
    module = load_adapter(adapter_dir).block.adapted_modules[0]
    tensors = load_file(str(bad / ADAPTER_WEIGHTS_FILE))
    tensors[peft_name(module, "A")] = tensors[peft_name(module, "A")][:-1].contiguous()
    save_file(tensors, str(bad / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    write_manifest(bad)  # a consistent directory with the wrong shapes
    with pytest.raises(ExportError, match=rf"{module}: lora_A .* do not match K=8"):
        load_adapter(bad)


def test_refused_info_names_the_file(adapter_dir: Path, tmp_path: Path) -> None:
    bad = Path(shutil.copytree(adapter_dir, tmp_path / "bad"))
    info = json.loads((bad / ADAPTER_INFO_FILE).read_text())
    info["base_fingerprint"] = "nope"
    (bad / ADAPTER_INFO_FILE).write_text(json.dumps(info))
    write_manifest(bad)
    with pytest.raises(ExportError, match=ADAPTER_INFO_FILE):
        load_adapter(bad)


def test_serve_cli_validates_adapters_before_starting(
    adapter_dir: Path, tiny_model_dirs: dict[str, Path], default_model_dir: Path, tmp_path: Path, capsys
) -> None:
    from badit_serve.launch.cli import main

    other = build_tiny_model("llama", default_model_dir, tmp_path / "other", seed=1)
    assert main([str(other), "--adapter", f"a={adapter_dir}"]) == 2
    assert "trained on a different base model" in capsys.readouterr().err
    assert main([str(tiny_model_dirs["llama"]), "--adapter", f"a={adapter_dir}", "--max-adapters", "0"]) == 2
    assert main([str(tiny_model_dirs["llama"]), "--adapter", "no-equals-sign"]) == 2
    assert "expected NAME=DIR" in capsys.readouterr().err


def test_serve_options_of_multi_adapter_mode(adapter_dir: Path, tiny_model_dirs: dict[str, Path]) -> None:
    from badit_serve.core.adapter_set import AdapterSpec, validate_adapter_set
    from badit_serve.launch.vllm_options import vllm_adapter_args

    specs = [AdapterSpec("a", adapter_dir), AdapterSpec("b", adapter_dir)]
    argv = vllm_adapter_args(validate_adapter_set(tiny_model_dirs["llama"], specs, 4))
    assert argv[argv.index("--max-loras") + 1] == "4" and "--enable-lora" in argv
    assert argv[argv.index("--lora-target-modules") + 1] == "gate_up_proj"
    assert argv[-2:] == [f"a={adapter_dir}", f"b={adapter_dir}"]
    overrides = json.loads(argv[argv.index("--hf-overrides") + 1])
    assert (
        overrides["architectures"] == ["BaditLlamaForCausalLM"]
        and overrides["badit_slots"]["max_adapters"] == 4
    )
    with pytest.raises(ExportError, match="unique"):
        validate_adapter_set(tiny_model_dirs["llama"], [specs[0], specs[0]], None)
