"""Per-request routing on the worker's host side: the steering rows written before each forward pass, and
the routed experts of each request handed to vLLM's output path after each step.

vLLM 0.32's scheduler (`AuxOutputSchedulerConnector.take_output`) takes, for every request that emits
output in a step, an `AuxRequestOutput(token_start, rows)`: the routed experts of the request's positions
from `token_start` on, and keeps `rows[: num_tokens - 1 - token_start]`; the output processor concatenates
a request's chunks into `routed_experts` (tokens - 1, layers, W) of the finished request, which the OpenAI
server returns base64 `.npy` in the choice. vLLM fills them from MoE layers on its V2 GPU runner only;
here the Badit layers capture them (`request_routing`) and `RequestRouting` turns each step's capture into
those outputs:

- per request a cursor: the first position not yet handed out (it starts at the request's
  `routed_experts_prompt_start`); rows computed past it wait until the request samples a token (a prompt
  chunk that samples nothing is kept), then go out in one piece;
- positions computed again (a preempted request recomputes its prompt) are not handed out twice;
  positions never computed before the first computed one (served from the prefix cache) are NO_EXPERT;
- a request's state ends with vLLM's finished ids.

Ids are vLLM's encoding: uint8 for up to 255 experts (uint16 above), NO_EXPERT as the dtype's largest value.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from badit_serve.core.steering import Steering, SteeringError, SteeringSpec, parse_steering
from badit_serve.vllm_models.request_routing import RequestRoutingBuffers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepBatch:
    """The requests of one forward pass in batch order, as the model runner laid them out."""

    req_ids: list[str]
    positions: list[int]
    """First position each request computes in this pass (its computed tokens before it)."""
    counts: list[int]
    """Tokens each request computes in this pass (its rows of the batch, in order)."""
    extra_args: list[Mapping[str, Any] | None]
    """Each request's `SamplingParams.extra_args` (the OpenAI body's `vllm_xargs`)."""
    first_returned: list[int]
    """Each request's first position to return (`routed_experts_prompt_start`, within the prompt)."""

    @property
    def tokens(self) -> int:
        return sum(self.counts)


def output_dtype(num_experts: int) -> np.dtype[Any]:
    """vLLM's dtype for routed-expert ids: uint8 for up to 255 experts (255 = NO_EXPERT), else uint16."""
    return np.dtype(np.uint8 if num_experts < 255 else np.uint16)


@dataclass
class _Pending:
    start: int
    """First position not yet handed out."""
    chunks: list[np.ndarray] = field(default_factory=list)
    end: int = 0
    """Position after the last row held."""


class RequestRouting:
    """The worker's per-request routing: steering rows in, routed experts out (see the module docstring)."""

    def __init__(self, buffers: RequestRoutingBuffers) -> None:
        self.buffers = buffers
        self.spec: SteeringSpec = buffers.spec
        self.dtype = output_dtype(self.spec.num_experts)
        self.no_expert = np.iinfo(self.dtype).max
        self._steering: dict[str, Steering] = {}
        self._pending: dict[str, _Pending] = {}
        self._steered_rows = 0
        """Rows of `buffers.bias` written by the last pass (zeroed before the next)."""
        self._batch: StepBatch | None = None

    def steering(self, req_id: str, extra: Mapping[str, Any] | None) -> Steering:
        """A request's controls, parsed once. The API server has validated them (400 otherwise); a request
        that reached the engine another way with bad values runs unsteered, with a warning."""
        known = self._steering.get(req_id)
        if known is None:
            try:
                known = parse_steering(extra, self.spec, "extra_args")
            except SteeringError as exc:
                logger.warning("Badit: request %s runs unsteered: %s", req_id, exc)
                known = Steering()
            self._steering[req_id] = known
        return known

    def before_forward(self, batch: StepBatch) -> None:
        """Write the batch's steering rows into the bias buffer (rows of unsteered requests stay zero)."""
        self._batch = batch
        rows = [
            self.steering(r, extra).bias for r, extra in zip(batch.req_ids, batch.extra_args, strict=True)
        ]
        bias = self.buffers.bias
        if self._steered_rows:
            bias[: self._steered_rows].zero_()
            self._steered_rows = 0
        if all(row is None for row in rows):
            return
        table = np.zeros((batch.tokens, self.spec.num_experts), dtype=np.float32)  # (T, K)
        offset = 0
        for row, count in zip(rows, batch.counts, strict=True):
            if row is not None:
                table[offset : offset + count] = row
            offset += count
        bias[: batch.tokens].copy_(torch.from_numpy(table))  # (T, K)
        self._steered_rows = batch.tokens

    def after_step(self) -> None:
        """Take this pass's captured routes (rows [0, T) of the buffer, to the host) into each request's
        pending rows."""
        batch, routes = self._batch, self.buffers.routes
        self._batch = None
        if batch is None or routes is None:
            return
        captured = routes[: batch.tokens].cpu().numpy()  # (T, L, W) int32, a copy off CPU tensors too
        captured = np.where(captured < 0, self.no_expert, captured).astype(self.dtype)  # (T, L, W)
        offset = 0
        for req_id, position, count, first in zip(
            batch.req_ids, batch.positions, batch.counts, batch.first_returned, strict=True
        ):
            self._add(req_id, position, captured[offset : offset + count], first)
            offset += count

    def _add(self, req_id: str, position: int, rows: np.ndarray, first: int) -> None:
        pending = self._pending.get(req_id)
        if pending is None:
            pending = self._pending[req_id] = _Pending(start=first, end=first)
        if position > pending.end:  # never computed here: served from the prefix cache
            gap = np.full((position - pending.end, *rows.shape[1:]), self.no_expert, dtype=self.dtype)
            pending.chunks.append(gap)
            pending.end = position
        skip = pending.end - position  # rows already held or handed out (recomputed after preemption)
        if skip < len(rows):
            pending.chunks.append(rows[skip:])
            pending.end = position + len(rows)

    def take(self, req_id: str, sampled: bool) -> tuple[int, np.ndarray] | None:
        """(token_start, rows) of a request in this step's output, None if it has no state. Rows are handed
        out (the cursor moves) only when the request sampled a token; otherwise they stay pending and are
        offered as they are (vLLM reads them only if the request ends without a token)."""
        pending = self._pending.get(req_id)
        if pending is None:
            return None
        shape = (0, *self._row_shape())
        rows = np.concatenate(pending.chunks) if pending.chunks else np.empty(shape, dtype=self.dtype)
        start = pending.start
        if sampled:
            pending.chunks, pending.start = [], pending.end
        else:
            pending.chunks = [rows] if len(rows) else []
        return start, rows

    def _row_shape(self) -> tuple[int, int]:
        routes = self.buffers.routes
        assert routes is not None
        return int(routes.shape[1]), int(routes.shape[2])

    def finish(self, req_ids: set[str] | list[str]) -> None:
        """Forget finished requests."""
        for req_id in req_ids:
            self._pending.pop(req_id, None)
            self._steering.pop(req_id, None)


def install_request_routing(model_runner: Any) -> RequestRouting | None:
    """Drive the model's per-request routing from this worker's model runner: the steering rows before each
    forward pass, the routed experts into each step's output. None when the model has no routed layers."""
    from badit_serve.internals import (
        attach_routed_experts,
        finished_request_ids,
        step_requests,
        wrap_runner_step,
    )

    model = model_runner.get_model()
    buffers: RequestRoutingBuffers | None = getattr(model, "badit_requests", None)
    if buffers is None:
        return None
    routing = RequestRouting(buffers)
    armed: list[bool] = [False]

    def before(scheduler_output: Any) -> None:
        routing.finish(finished_request_ids(scheduler_output))
        armed[0] = True

    def on_forward() -> None:  # the model's forward, inside execute_model (dummy runs are not armed)
        if not armed[0]:
            return
        armed[0] = False
        req_ids, positions, counts, states = step_requests(model_runner)
        routing.before_forward(
            StepBatch(
                req_ids,
                positions,
                counts,
                [s.sampling_params.extra_args if s.sampling_params else None for s in states],
                [first_returned(s) for s in states],
            )
        )

    def after(output: Any) -> Any:
        armed[0] = False
        routing.after_step()
        if buffers.routes is None:
            return output
        return attach_routed_experts(output, routing.take)

    wrap_runner_step(model_runner, before, after)
    model.badit_step_hook = on_forward
    return routing


def first_returned(state: Any) -> int:
    """A request's first position to return: vLLM's `routed_experts_prompt_start`, within its prompt."""
    params = state.sampling_params
    start = int(getattr(params, "routed_experts_prompt_start", 0) or 0)
    return max(0, min(start, int(state.num_prompt_tokens)))
