"""Reading the vLLM options badit-serve passes through: `--flag value`, `--flag=value`, `--flag_name` (vLLM
accepts underscores), and short forms such as `-tp`. One reading for every question badit-serve asks of them
(is an option given, what value does it have)."""

from __future__ import annotations


def _option(arg: str) -> tuple[str, str | None]:
    """`--x_y=2` -> ("--x-y", "2"); `--x` -> ("--x", None); a value -> (value, None)."""
    name, eq, inline = arg.partition("=")
    if not name.startswith("-"):
        return arg, None
    return name.replace("_", "-"), inline if eq else None


def given(passthrough: list[str], *names: str) -> bool:
    """Whether any of the options `names` was passed through."""
    return any(_option(arg)[0] in names for arg in passthrough)


def option_value(passthrough: list[str], names: tuple[str, ...]) -> str | None:
    """The value of the last of `names` in `passthrough`, or None."""
    value = None
    for i, arg in enumerate(passthrough):
        name, inline = _option(arg)
        if name not in names:
            continue
        if inline is not None:
            value = inline
        elif i + 1 < len(passthrough):
            value = passthrough[i + 1]
    return value
