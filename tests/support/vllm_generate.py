"""Run greedy generation of a Badit export in vLLM, in its own process (used by test_vllm_parity).

    python tests/support/vllm_generate.py REQUEST.json RESULT.json

REQUEST: {"export": dir, "prompts": [[token ids]], "max_tokens": n, "tensor_parallel_size": tp (default 1),
"enforce_eager": bool (default true; false = vLLM's torch.compile mode), "dtype" (default float32). RESULT: [{"token_ids", "logprobs"}] with
the logprob of each generated token. One engine, shut down when the process ends.
"""

from __future__ import annotations

import json
import sys


def main(request_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams

    request = json.loads(open(request_path).read())
    llm = LLM(
        model=request["export"],
        dtype=request.get("dtype", "float32"),
        enforce_eager=request.get("enforce_eager", True),
        max_model_len=512,
        seed=0,
        enable_prefix_caching=False,
        kv_cache_memory_bytes=512 * 1024**2,
        tensor_parallel_size=request.get("tensor_parallel_size", 1),
    )
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], logprobs=0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], params, use_tqdm=False)
    result = []
    for output in outputs:
        completion = output.outputs[0]
        logprobs = [
            step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids, strict=True)
        ]
        result.append({"token_ids": list(completion.token_ids), "logprobs": logprobs})
    with open(result_path, "w") as handle:
        json.dump(result, handle)
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
