"""Command-line entry points (`badit-model`, `badit-data`, `badit-train`)."""
