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


def test_an_adapter_directory_lists_its_adapters_and_validates_each_version_once(
    adapter_dir: Path, tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from badit_serve.core.adapter import SlotGeometry, base_dir_fingerprint
    from badit_serve.core.adapter_set import AdapterDirectory

    root = tmp_path / "adapters"
    for name in ("b", "a"):
        shutil.copytree(adapter_dir, root / name)
    (root / "not_an_adapter").mkdir()
    base = tiny_model_dirs["llama"]
    geometry = SlotGeometry.of(load_adapter(adapter_dir).block, 2)
    directory = AdapterDirectory(root, base, base_dir_fingerprint(base, geometry.adapted_modules), geometry)
    assert directory.names() == ["a", "b"]
    assert [directory.path(n) for n in ("../a", "a/..", ".a", "", "not_an_adapter")] == [None] * 5
    assert directory.validate("a").path == root / "a" and directory.validate("a") is directory.validate("a")
    assert directory.validations == 1 and not directory.changed("a")
    (root / "a" / "extra.txt").write_text("a file more")  # a registered adapter's files must not change
    assert directory.changed("a")
    weights = root / "b" / ADAPTER_WEIGHTS_FILE
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    for _ in range(2):  # the refusal is kept too, until a file changes
        with pytest.raises(ExportError, match=ADAPTER_WEIGHTS_FILE):
            directory.validate("b")
    assert directory.validations == 2
    shutil.copy(adapter_dir / ADAPTER_WEIGHTS_FILE, weights)  # repaired: validated again
    assert directory.validate("b").path == root / "b" and directory.validations == 3
    with pytest.raises(ExportError, match="no adapter 'c'"):
        directory.validate("c")


def test_adapter_dir_options_keep_known_host_and_slot_counts_apart(
    adapter_dir: Path, tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from badit_serve.core.adapter_set import DEFAULT_SLOTS, AdapterSpec, validate_adapter_set
    from badit_serve.launch.vllm_options import vllm_adapter_args

    root = tmp_path / "adapters"
    shutil.copytree(adapter_dir, root / "only")
    base = tiny_model_dirs["llama"]
    argv = vllm_adapter_args(validate_adapter_set(base, [], None, adapter_dir=root))
    assert argv[argv.index("--max-loras") + 1] == str(DEFAULT_SLOTS)
    assert argv[argv.index("--max-cpu-loras") + 1] == str(2 * DEFAULT_SLOTS) and "--lora-modules" not in argv
    specs = [AdapterSpec(n, adapter_dir) for n in "abc"]  # more named adapters than slots: they wait
    argv = vllm_adapter_args(validate_adapter_set(base, specs, 1, max_cpu_adapters=2))
    assert (argv[argv.index("--max-loras") + 1], argv[argv.index("--max-cpu-loras") + 1]) == ("1", "2")
    with pytest.raises(ExportError, match="less than the 2 slots"):
        validate_adapter_set(base, specs, 2, max_cpu_adapters=1)
    with pytest.raises(ExportError, match="no loadable adapter"):
        validate_adapter_set(base, [], None, adapter_dir=tmp_path / "empty")


def test_the_collector_counts_residency_moves_and_keeps_per_layer_series_summed_over_adapters() -> None:
    from badit_serve.metrics.adapter_metrics import AdapterStatsCollector
    from badit_serve.metrics.residency import residency_metrics

    slots: list[int | None] = [None, None]
    host: set[int] = set()
    collector = AdapterStatsCollector(
        {}, lambda: list(slots), names={1: "x1", 2: "x2"}, host_ids=lambda: set(host)
    )
    collector.start(interval=0)

    def value(metric: object, **labels: str) -> float:
        for family in metric.collect():  # type: ignore[attr-defined]
            for sample in family.samples:
                if sample.labels == labels and not sample.name.endswith("_created"):
                    return float(sample.value)
        return 0.0

    metrics = residency_metrics()
    base = {k: value(metrics.loads, adapter="x1", into=k) for k in ("host", "slot")}
    host.add(1)
    slots[0] = 1
    collector.flush()
    assert value(metrics.loads, adapter="x1", into="host") == base["host"] + 1
    assert value(metrics.loads, adapter="x1", into="slot") == base["slot"] + 1
    assert value(metrics.residency, adapter="x1") == 2
    evicted = value(metrics.evictions, adapter="x1", **{"from": "slot"})
    slots[0], host = 2, {2}
    collector.flush()
    assert value(metrics.evictions, adapter="x1", **{"from": "slot"}) == evicted + 1
    assert value(metrics.residency, adapter="x1") == 0 and value(metrics.residency, adapter="x2") == 2
    assert collector.residency() == {2: "slot"}


def test_an_adapters_serving_form_is_built_once_per_tensor_object_and_dropped_with_it() -> None:
    import gc

    from badit_serve.vllm_models.adapter_slots import BuiltAdapters

    built = BuiltAdapters()
    a, b = torch.randn(4, 3), torch.randn(5, 4)
    first = built.get(a, b, lambda: object())  # type: ignore[arg-type,return-value]
    assert built.get(a, b, lambda: object()) is first and built.builds == 1  # type: ignore[arg-type,return-value]
    other_b = torch.randn(5, 4)
    assert built.get(a, other_b, lambda: object()) is not first and built.builds == 2  # type: ignore[arg-type,return-value]
    del a
    gc.collect()
    assert len(built) == 0  # vLLM freed the tensors (evicted from host memory): the form goes too
    again = torch.randn(4, 3)  # possibly at the old address: a new object, built anew
    assert built.get(again, b, lambda: object()) is not first and built.builds == 3  # type: ignore[arg-type,return-value]
