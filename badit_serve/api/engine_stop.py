"""In-flight requests learn that the engine has stopped (a fix for vLLM 0.32's shutdown).

On SIGTERM / SIGINT vLLM's API server calls `AsyncLLM.shutdown`, which kills the EngineCore and then
cancels the output-handler task that feeds every request's queue. When that handler has already seen the
dead engine, it fails every request with EngineDeadError (`OutputProcessor.propagate_error`), and each open
stream ends with an error event and `data: [DONE]`. When the cancellation lands first, nothing tells the
requests: their streams hang with no further event, and uvicorn's graceful shutdown waits for those
connections without a time limit, so the server exits only when its clients give up (seen here under a
16-stream load: the streams stalled until the clients' 30 s timeout).

`end_requests_when_engine_stops` makes the handler's cancellation do what its failure does.
"""

from __future__ import annotations

import asyncio
from typing import Any

from badit_serve.internals import engine_output_handler


def end_requests_when_engine_stops(engine_client: Any) -> bool:
    """On a cancelled output handler, fail every request still waiting with EngineDeadError (as vLLM's own
    handler does when it sees the engine die). False when the engine client has no such handler (not an
    AsyncLLM, or its handler not started in this event loop)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    found = engine_output_handler(engine_client)
    if found is None:
        return False
    handler, processor = found

    def on_done(task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            processor.propagate_error(EngineDeadError())

    handler.add_done_callback(on_done)
    return True
