"""The contract shared by training, the offline tools and serving: the only part of `badit_serve` that
`training/` imports, and free of vLLM, FastAPI and Starlette (tests/test_layout.py checks both)."""
