"""The vLLM options of multi-adapter serving (`badit-serve BASE --adapter NAME=DIR ...`).

vLLM's LoRA machinery carries the per-request choice of adapter (`badit_serve.vllm_models.adapter_slots`):

    --enable-lora --max-loras S --max-cpu-loras C --max-lora-rank R' --lora-target-modules gate_up_proj
    --lora-modules NAME=DIR ... --hf-overrides {"architectures": [Badit class], "badit_slots": geometry}
"""

from __future__ import annotations

import json
from typing import Any

from badit_serve.core.adapter import LORA_TARGET, SLOTS_CONFIG_KEY
from badit_serve.core.adapter_set import AdapterSet
from badit_serve.core.architectures import BADIT_ARCHITECTURES
from badit_serve.core.export_io import ExportError

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM 0.32's allowed --max-lora-rank values (vllm/config/lora.py MaxLoRARanks)."""


def lora_rank_limit(rank: int) -> int:
    """The smallest vLLM --max-lora-rank that admits adapters of stored rank `rank`."""
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise ExportError(f"expert rank {rank} exceeds vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")
    return fits[0]


def vllm_engine_kwargs(adapter_set: AdapterSet) -> dict[str, Any]:
    """vLLM EngineArgs of multi-adapter mode (see the module docstring); the adapters themselves are
    LoRARequests (the server's --lora-modules)."""
    g = adapter_set.geometry
    return {
        "enable_lora": True,
        "max_loras": g.max_adapters,
        "max_cpu_loras": adapter_set.max_cpu_adapters,
        "max_lora_rank": lora_rank_limit(g.rank),
        "lora_target_modules": [LORA_TARGET],
        "hf_overrides": {
            "architectures": [BADIT_ARCHITECTURES[adapter_set.base_architecture]],
            SLOTS_CONFIG_KEY: g.model_dump(mode="json"),
        },
    }


def vllm_adapter_args(adapter_set: AdapterSet) -> list[str]:
    """`vllm_engine_kwargs` as serve options, plus --lora-modules NAME=DIR for every adapter."""
    argv = []
    for key, value in vllm_engine_kwargs(adapter_set).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    if adapter_set.adapters:
        argv += ["--lora-modules", *(f"{n}={a.path}" for n, a in adapter_set.adapters.items())]
    return argv
