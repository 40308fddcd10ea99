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
    for method in ("lora", "pissa", "loramoe", "badit_no_dog", "badit_no_bad"):
        assert f"superni15_mixed_{method}" in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_yaml_maps_one_to_one_onto_run_config(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    assert RunConfig.model_validate(yaml.safe_load(dump_config(cfg))) == cfg
    for section, values in raw.items():
        dumped = cfg.model_dump(mode="json")[section]
        for key, value in values.items():
            if not isinstance(value, dict):
                assert dumped[key] == value, f"{path.name}: {section}.{key}"


def test_paper_settings() -> None:
    cfg = load_config(CONFIG_DIR / "superni15_mixed.yaml")
    r = cfg.adapter.resolved()
    assert (r.num_experts, cfg.adapter.rank, r.top_k, cfg.adapter.dropout) == (8, 8, 4, 0.05)
    assert (cfg.train.lr, cfg.train.scheduler, cfg.train.warmup_ratio, cfg.train.epochs) == (
        2e-4,
        "cosine",
        0.03,
        10,
    )
    assert (cfg.data.max_length, cfg.data.max_target_tokens) == (1024, 50)
    assert load_config(CONFIG_DIR / "superni15_sequential.yaml").train.mode == "sequential"


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
    from badit_serve import expert_metrics

    source = Path(expert_metrics.__file__).read_text()
    for series in ("badit_expert_tokens", "badit_expert_tokens_by_ability", "badit_router_weight_sum"):
        assert f'"{series}' in source, series
