"""Badit serving: one package per process boundary, around one shared contract.

core/         the contract shared with `training/`: the export and adapter formats and their I/O, the
              routed math, the model families, atomic writes, exit codes, the reference loader, the
              adapter-set validation. No vLLM, FastAPI or Starlette import (tests/test_layout.py).
vllm_models/  vLLM's engine worker: the Badit model classes, the served experts, the adapter-slot layer,
              the counting op, the CPU GEMM.
metrics/      vLLM's engine worker: the per-expert and per-adapter collectors, the worker extension.
api/          vLLM's API server process: the Badit endpoints, request limits, schemas, engine stop.
launch/       the `badit-serve` parent: the command line, the supervisor, the server process helper.
plugin.py     vLLM's entry point, called in every vLLM process.
internals.py  the one seam for private vLLM and torch APIs, each use commented.
"""
