"""Every YAML under configs/ validates against RunConfig; overrides and errors behave."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from training.config import ConfigError, RunConfig, dump_config, load_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def test_configs_exist() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "superni15_mixed", "superni15_sequential"} <= names
    for method in ("lora", "pissa", "loramoe", "loramoe_dense", "badit_no_dog", "badit_no_bad"):
        assert f"superni15_mixed_{method}" in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_yaml_maps_one_to_one_onto_run_config(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    raw.pop("base", None)
    cfg = load_config(path)
    assert RunConfig.model_validate(yaml.safe_load(dump_config(cfg))) == cfg
    for section, values in raw.items():
        dumped = cfg.model_dump(mode="json")[section]
        for key, value in values.items():
            if not isinstance(value, dict):
                assert dumped[key] == value, f"{path.name}: {section}.{key}"


def test_paper_settings_follow_g4_and_the_released_files() -> None:
    """App. G.4 with its lost numbers from wangbing1416/BADIT (config/lora.config, src/run_*.sh)."""
    cfg = load_config(CONFIG_DIR / "superni15_mixed.yaml")
    a, t, r = cfg.adapter, cfg.train, cfg.adapter.resolved()
    assert (a.method, r.num_experts, r.top_k, a.rank, r.alpha, a.dropout, a.target_modules) == (
        "badit",
        8,
        4,
        4,
        32.0,
        0.05,
        ["gate_proj"],
    )
    assert (t.epochs, t.batch_size, t.grad_accum, t.lr, t.scheduler, t.warmup_ratio, t.weight_decay) == (
        10,
        8,  # per-device 1 on 8 GPUs: effective global batch 8
        1,
        2e-4,
        "cosine",
        0.03,
        0.0,
    )
    assert (cfg.model.dtype, t.autocast_bf16) == ("bfloat16", True)
    assert (cfg.data.max_length, cfg.data.max_target_tokens) == (1024, 50)


# What each paper config changes relative to superni15_mixed.yaml (its base); everything else is equal.
DIFFERS_FROM_BASE = {
    "superni15_sequential": {"train.mode": "sequential", "train.task_order": "order1"},
    "superni15_mixed_lora": {"adapter.method": "lora"},
    "superni15_mixed_pissa": {"adapter.method": "pissa"},
    "superni15_mixed_loramoe": {"adapter.method": "loramoe"},
    "superni15_mixed_loramoe_dense": {"adapter.method": "loramoe_dense", "adapter.num_experts": 4},
    "superni15_mixed_badit_no_dog": {"adapter.method": "badit_no_dog"},
    "superni15_mixed_badit_no_bad": {"adapter.method": "badit_no_bad"},
}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", sorted(DIFFERS_FROM_BASE))
def test_baselines_differ_from_the_base_only_where_they_say(name: str) -> None:
    base = _flat(load_config(CONFIG_DIR / "superni15_mixed.yaml").model_dump(mode="json"))
    cfg = _flat(load_config(CONFIG_DIR / f"{name}.yaml").model_dump(mode="json"))
    diff = {k: v for k, v in cfg.items() if base[k] != v and k != "output.dir"}
    assert diff == DIFFERS_FROM_BASE[name]
    assert cfg["output.dir"] == f"runs/{name}"
    assert yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())["base"] == "superni15_mixed.yaml"


def test_base_chain_merges_sections_and_reports_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "train: {lr: 0.1, epochs: 3}\nadapter: {rank: 4, target_modules: [q_proj, v_proj]}\n"
    )
    (tmp_path / "b.yaml").write_text(
        "base: a.yaml\ntrain: {lr: 0.2}\nadapter: {target_modules: [gate_proj]}\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("base: ../b.yaml\ntrain: {epochs: 5}\n")
    cfg = load_config(tmp_path / "sub" / "c.yaml", ["train.lr=0.3"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.adapter.rank) == (0.3, 5, 4)
    assert cfg.adapter.target_modules == ["gate_proj"]  # lists replace, they do not concatenate
    assert load_config(tmp_path / "b.yaml").train.lr == 0.2
    (tmp_path / "loop1.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop1.yaml\n")
    with pytest.raises(ConfigError, match="base chain loops"):
        load_config(tmp_path / "loop1.yaml")
    (tmp_path / "orphan.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml.*base of .*orphan\.yaml"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "typo.yaml").write_text("base: a.yaml\ntrain: {lr: -1}\n")
    with pytest.raises(ConfigError, match=r"(?s)typo\.yaml.*train\.lr"):
        load_config(tmp_path / "typo.yaml")


def test_dotted_overrides_are_typed() -> None:
    cfg = load_config(
        CONFIG_DIR / "quickstart.yaml", ["train.lr=1e-4", "adapter.dog.every_n_steps=7", "data.tasks=[a, b]"]
    )
    assert cfg.train.lr == 1e-4 and cfg.adapter.dog.every_n_steps == 7 and cfg.data.tasks == ["a", "b"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lr=-1", "train.lr"),
        ("train.nope=1", "train.nope"),
        ("adapter.top_k=9", "top_k"),
        ("adapter.dropout=1.5", "adapter.dropout"),
        ("train.mode=parallel", "train.mode"),
        ("noequals", "key=value"),
    ],
)
def test_bad_values_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(CONFIG_DIR / "quickstart.yaml", [override])


def test_bad_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_field_has_a_docstring() -> None:
    from pydantic import BaseModel

    def walk(model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation)

    walk(RunConfig)


def test_grafana_dashboard_queries_the_served_series() -> None:
    import json

    dashboard = json.loads((CONFIG_DIR.parent / "docs" / "grafana-badit.json").read_text())
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    for series in (
        "badit_expert_tokens_total",
        "badit_expert_tokens_by_ability_total",
        "badit_router_weight_sum_total",
    ):
        assert series in exprs
    from badit_serve.metrics import expert_metrics

    source = Path(expert_metrics.__file__).read_text()
    for series in ("badit_expert_tokens", "badit_expert_tokens_by_ability", "badit_router_weight_sum"):
        assert f'"{series}' in source, series
