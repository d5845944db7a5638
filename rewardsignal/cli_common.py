"""What the `signal` subcommands share: usage errors, environment fallbacks,
tables, and the flags of every command that talks to a coordinator."""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_URL = "http://127.0.0.1:8000"


def die(message: str) -> SystemExit:
    """A usage error: say what is wrong and exit 2, as argparse does."""
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(2)


def env(name: str, cast=str, default=None):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except ValueError:
        raise die(f"environment variable {name}={raw!r} is not a valid "
                         f"{getattr(cast, '__name__', 'value')}") from None


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def positive(cast):
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = cast.__name__
    return parse


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def coordinator_url_default() -> str:
    """``SIGNAL_URL``, or its older name ``SIGNAL_COORDINATOR``, or the local default."""
    return env("SIGNAL_URL") or env("SIGNAL_COORDINATOR") or DEFAULT_URL


def add_client_args(p: argparse.ArgumentParser) -> None:
    """--coordinator and --api-key, the same on every command that calls a coordinator."""
    p.add_argument("--coordinator", "--url", dest="coordinator",
                   default=coordinator_url_default(),
                   help="coordinator URL (env SIGNAL_URL; SIGNAL_COORDINATOR also read; "
                        "default %(default)s)")
    p.add_argument("--api-key", default=env("SIGNAL_API_KEY"),
                   help="your API key (env SIGNAL_API_KEY; not needed on a coordinator "
                        "without keys)")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings
                or action.default in (None, False, argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose help shows defaults (sub-commands too)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)
