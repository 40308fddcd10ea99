"""What runs in vLLM's API server process: the Badit routes (`endpoint`, `adapter_endpoint`), the request
gate (`limits`), the response schemas and the engine-stop watcher. Never imports `badit_serve.launch`."""
