"""vLLM model classes for Badit exports: the base family's vLLM class with routed gate_proj experts.

One small module per family (llama, qwen2, qwen3, gemma2), the shared routed MLP in `mlp`, the mixin that
installs and loads it in `common`, and the routing statistics in `routing_stats`. Importing this
package does not import vLLM; the family modules do. Registered with vLLM by `badit_serve.plugin`.
"""
