"""The `badit-serve` parent process: the command line (`cli`), vLLM's options for a set of adapters
(`vllm_options`), the supervisor that outlives no child of its own (`supervisor`), and the helper that
starts, health-polls and stops a server for tests, demos and benchmarks (`server_process`)."""
