"""Every YAML under configs/ validates against RunConfig; overrides and errors behave."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml

from training.adapters.config import AdapterConfig
from training.config import ConfigError, RunConfig, dump_config, load_config
from training.data import load_tasks

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


# What every config resolves to, captured before presets took ownership of their shape (issue 29): the
# adapter as (method, num_experts, top_k, init, router, alpha, gate_scale, dog, branching), and the data as
# (number of data.tasks, data.max_train_by_task), (None, None) where not listed.
RESOLVED_ADAPTER = {
    "quickstart": ("badit", 8, 4, "bad", "topk", 8.0, 4.0, True, None),
    "quickstart_b": ("badit", 8, 4, "bad", "topk", 8.0, 4.0, True, None),
    "superni15_mixed": ("badit", 8, 4, "bad", "topk", 32.0, 4.0, True, None),
    "superni15_mixed_badit_no_bad": ("badit_no_bad", 8, 4, "lora", "topk", 32.0, 4.0, True, None),
    "superni15_mixed_badit_no_dog": ("badit_no_dog", 8, 4, "bad", "topk", 32.0, 4.0, False, None),
    "superni15_mixed_gainlora": ("gainlora", 1, 1, "lora", "dense", 32.0, 1.0, False, "gated"),
    "superni15_mixed_lora": ("lora", 1, 1, "lora", "none", 32.0, 1.0, False, None),
    "superni15_mixed_loramoe": ("loramoe", 8, 4, "lora", "topk", 32.0, 4.0, False, None),
    "superni15_mixed_loramoe_dense": ("loramoe_dense", 4, 4, "lora", "dense", 32.0, 1.0, False, None),
    "superni15_mixed_o-lora": ("o-lora", 1, 1, "lora", "none", 32.0, 1.0, False, "sum"),
    "superni15_mixed_olora": ("olora", 1, 1, "olora", "none", 32.0, 1.0, False, None),
    "superni15_mixed_pissa": ("pissa", 1, 1, "pissa", "none", 32.0, 1.0, False, None),
    "superni15_sequential": ("badit", 8, 4, "bad", "topk", 32.0, 4.0, True, None),
    "superni15_sequential_gainlora": ("gainlora", 15, 15, "lora", "dense", 32.0, 1.0, False, "gated"),
    "superni15_sequential_o-lora": ("o-lora", 1, 1, "lora", "none", 32.0, 1.0, False, "sum"),
}
RESOLVED_DATA = {
    "quickstart": (3, {"task363_sst2_polarity_classification": 240}),
    "quickstart_b": (3, None),
}


def test_every_config_is_in_the_resolved_table() -> None:
    assert sorted(RESOLVED_ADAPTER) == [p.stem for p in CONFIGS]


@pytest.mark.parametrize("name", sorted(RESOLVED_ADAPTER))
def test_every_config_resolves_as_before(name: str) -> None:
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    r, tasks = cfg.adapter.resolved(), cfg.data.tasks
    got = (
        cfg.adapter.method,
        r.num_experts,
        r.top_k,
        r.init,
        r.router,
        r.alpha,
        r.gate_scale,
        r.dog,
        r.branching,
    )
    assert got == RESOLVED_ADAPTER[name]
    assert (tasks and len(tasks), cfg.data.max_train_by_task) == RESOLVED_DATA.get(name, (None, None))


QUICKSTART_TASKS = (
    "task363_sst2_polarity_classification",
    "task073_commonsenseqa_answer_generation",
    "task1290_xsum_summarization",
)


def _write_tasks(root: Path, names: Iterable[str], n_train: int = 12) -> None:
    """Minimal SuperNI task folders: `n_train` training and 2 test instances each."""
    for name in names:
        (root / name).mkdir(parents=True)
        for split, count in (("train", n_train), ("test", 2)):
            instances = [{"id": f"{split}-{i}", "input": f"q{i}", "output": ["a"]} for i in range(count)]
            doc = {"Definition": ["Answer."], "Instances": instances}
            (root / name / f"{split}.json").write_text(json.dumps(doc))


def test_task_override_ignores_the_caps_of_tasks_not_run(tmp_path: Path) -> None:
    """quickstart.yaml caps sst2 at 240; running xsum alone must not also demand clearing the caps (issue 29)."""
    _write_tasks(tmp_path, QUICKSTART_TASKS)
    quickstart = CONFIG_DIR / "quickstart.yaml"
    cfg = load_config(
        quickstart, [f"data.superni_dir={tmp_path}", "data.tasks=[task1290_xsum_summarization]"]
    )
    with pytest.warns(UserWarning, match="max_train_by_task.*task363_sst2_polarity_classification"):
        tasks = load_tasks(cfg.data)
    assert [(t.name, len(t.train)) for t in tasks] == [("task1290_xsum_summarization", 8)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every cap names a task of the run: nothing to warn about
        tasks = load_tasks(load_config(quickstart, [f"data.superni_dir={tmp_path}"]).data)
    assert [len(t.train) for t in tasks] == [12, 8, 8]


@pytest.mark.parametrize("method", ["lora", "pissa", "olora", "o-lora", "gainlora", "loramoe_dense"])
def test_method_override_takes_the_method_presets_shape(method: str) -> None:
    """quickstart.yaml writes badit's num_experts 8 and top_k 4; `--set adapter.method=...` alone switches
    to the new method's shape (issue 29), as if the file had named that method."""
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", [f"adapter.method={method}"])
    assert (cfg.adapter.num_experts, cfg.adapter.top_k) == (None, None)
    assert cfg.adapter.resolved() == AdapterConfig(method=method, rank=8).resolved()


def test_shape_written_for_another_method_yields_to_the_preset(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        "adapter: {method: badit, num_experts: 16, top_k: 2, init: bad-residual, gate_scale: 3.0,\n"
        "          dog: {enabled: false, every_n_steps: 7}}\n"
    )
    for method in ("lora", "badit_no_bad"):
        (tmp_path / f"{method}.yaml").write_text(f"base: base.yaml\nadapter: {{method: {method}}}\n")
        adapter = load_config(tmp_path / f"{method}.yaml").adapter
        assert adapter.resolved() == AdapterConfig(method=method).resolved()  # badit_no_bad: DOG on again
        assert adapter.dog.every_n_steps == 7  # not a preset field: inherited as before
    (tmp_path / "rank.yaml").write_text("base: base.yaml\nadapter: {rank: 4}\n")
    (tmp_path / "again.yaml").write_text("base: base.yaml\nadapter: {method: badit}\n")
    written_for_badit = (16, 2, "bad-residual", 3.0, False)
    for path, overrides in (("rank", []), ("again", []), ("lora", ["adapter.method=badit"])):
        r = load_config(tmp_path / f"{path}.yaml", overrides).adapter.resolved()
        assert (r.num_experts, r.top_k, r.init, r.gate_scale, r.dog) == written_for_badit, (path, overrides)


PRESET_OF_LORA = r" \(preset of adapter\.method='lora'\)"


@pytest.mark.parametrize(
    "config,overrides,message",
    [
        (
            "superni15_mixed_lora",
            ["adapter.num_experts=4"],
            r"adapter\.num_experts=4 contradicts adapter\.router='none'" + PRESET_OF_LORA,
        ),
        (
            "quickstart",
            ["adapter.method=lora", "adapter.num_experts=4"],
            r"adapter\.num_experts=4 contradicts adapter\.router='none'" + PRESET_OF_LORA,
        ),
        (
            "superni15_mixed_lora",
            ["adapter.top_k=2"],
            r"adapter\.top_k=2 contradicts adapter\.num_experts=1" + PRESET_OF_LORA,
        ),
        (
            "superni15_mixed_pissa",
            ["adapter.num_experts=2"],
            r"adapter\.num_experts=2 contradicts adapter\.init='pissa'",
        ),
        (
            "quickstart",
            ["adapter.method=o-lora", "adapter.top_k=2"],
            r"adapter\.method='o-lora'.*branches\.count.*adapter\.top_k",
        ),
    ],
)
def test_explicit_shape_that_contradicts_the_method_names_the_field(
    config: str, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=rf"(?s){config}\.yaml.*{message}"):
        load_config(CONFIG_DIR / f"{config}.yaml", overrides)


def test_shape_written_with_the_method_in_one_file_is_explicit(tmp_path: Path) -> None:
    (tmp_path / "lora4.yaml").write_text("adapter: {method: lora, num_experts: 4}\n")
    with pytest.raises(ConfigError, match=r"adapter\.num_experts=4 contradicts"):
        load_config(tmp_path / "lora4.yaml")
    (tmp_path / "routed.yaml").write_text("base: lora4.yaml\nadapter: {router: topk}\n")
    r = load_config(tmp_path / "routed.yaml").adapter.resolved()  # a router for K experts: consistent again
    assert (r.num_experts, r.top_k, r.router, r.init) == (4, 1, "topk", "lora")


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
