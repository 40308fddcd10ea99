"""What runs in vLLM's engine worker to count routing: the per-expert and per-adapter Prometheus collectors
and the worker extension that reads the model's counts."""
