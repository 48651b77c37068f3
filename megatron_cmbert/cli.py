"""The one shell every tool runs in: flags generated from dataclasses, one exit-code convention, rank-aware
error lines, quiet third-party notices, and progress that still talks when stdout is not a terminal.

A tool is written as

    def run(argv=None) -> RESULT:      # parses its flags, does the work, returns what tests inspect
        args = build_parser().parse_args(argv)
        ...
    def main(argv=None) -> int:
        return cli.run_tool(run, argv)
    if __name__ == "__main__":
        sys.exit(main())

Exit codes (documented in the README): 0 done; 2 a user error (`UserError`, a bad flag: one line
`error: ...`); 1 a known failure (`ToolFailure`, one line) or a bug (its traceback); 130 interrupted.
Under torchrun, rank 0 prints `error: ...`; another rank waits OTHER_RANK_GRACE_S first (torchrun ends every
worker once one exits, and rank 0's line is the one wanted) and then prints `error (rank N): ...`.

Flags from dataclasses (`add_dataclass_args`): the flag is the field name with '-' for '_' (Megatron's
names: --global-batch-size), the help is the field's docstring (the string literal after it), type, choices
and `nargs` come from the annotation and `field(metadata=...)` ("choices", "metavar", "aliases", "help";
"add_arguments": a function(group, dest) adding the field's flags itself),
a field without a default is required, a bool defaulting to False is `--name`, one defaulting to True is
`--no-name`. Field names must be unique across a tree, so a flat namespace maps back (`from_namespace`).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import sys
import textwrap
import time
import types
import typing
from dataclasses import fields
from typing import Any, Callable, Iterable, Optional

from megatron_cmbert.errors import ToolFailure, UserError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
OTHER_RANK_GRACE_S = 10.0
PROGRESS_INTERVAL_S = 30.0


class UsageError(UserError):
    """A flag argparse refused (unknown, missing, malformed)."""


class ToolParser(argparse.ArgumentParser):
    """argparse whose errors are raised (UsageError, or `error_class`, a UserError: one line through
    run_tool) instead of usage + exit 2; the description (the tool's docstring) is kept as written."""

    def __init__(self, *args, error_class: type = UsageError, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.error_class = error_class

    def error(self, message):
        raise self.error_class(message)


# ---- flags from dataclasses --------------------------------------------------------------------------------
def field_docs(cls) -> dict[str, str]:
    """{field: docstring} read from the class source: the string literal right after each annotated field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # generated classes have no source; their help is in metadata
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def unwrap_optional(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_args(parser, cls, title: Optional[str] = None, seen: Optional[set] = None):
    """Add one flag per field of dataclass `cls` (nested dataclasses become their own argument groups)."""
    seen = set() if seen is None else seen
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(title or getattr(cls, "TITLE", cls.__name__))
    for f in fields(cls):
        tp = unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            add_dataclass_args(parser, tp, None, seen)
            continue
        if f.name in seen:
            raise TypeError(f"field {f.name} appears twice in the config tree; flags must be unique")
        seen.add(f.name)
        meta = f.metadata
        help_text = meta.get("help") or docs.get(f.name, "")
        if "add_arguments" in meta:  # a field whose flags need more than one spelling or a custom action
            meta["add_arguments"](group, f.name)
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        flags = [flag_name(f.name), *meta.get("aliases", ())]
        kwargs: dict[str, Any] = {"dest": f.name}
        if tp is bool:
            if default:  # --no-name turns a default-on switch off
                flags = ["--no-" + f.name.replace("_", "-")]
                kwargs.update(action="store_false", default=True)
            else:
                kwargs.update(action="store_true", default=False)
        else:
            if typing.get_origin(tp) is list:
                kwargs["nargs"] = "+"
                tp = typing.get_args(tp)[0]
            kwargs.update(type=tp, default=default, required=required)
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
            if "metavar" in meta:
                kwargs["metavar"] = meta["metavar"]
            if not required and default is not None:
                help_text += f" (default {default})"
        group.add_argument(*flags, help=help_text.replace("%", "%%"), **kwargs)
    return parser


def from_namespace(cls, ns: argparse.Namespace):
    """Build dataclass `cls` (recursively) from the flat namespace that add_dataclass_args produced."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        tp = unwrap_optional(hints[f.name])
        values[f.name] = from_namespace(tp, ns) if dataclasses.is_dataclass(tp) else getattr(ns, f.name)
    return cls(**values)


# ---- running a tool ----------------------------------------------------------------------------------------
def rank() -> int:
    """This process's rank under torchrun (0 outside it)."""
    return int(os.environ.get("RANK", "0"))


def one_line(exc: BaseException | str) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def print_error(message: str, process_rank: Optional[int] = None) -> None:
    """`error: ...` on stderr; another rank than 0 waits OTHER_RANK_GRACE_S, then `error (rank N): ...`."""
    r = rank() if process_rank is None else process_rank
    if r == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(OTHER_RANK_GRACE_S)
        print(f"error (rank {r}): {message}", file=sys.stderr, flush=True)


def quiet_third_party() -> None:
    """Silence notices that say nothing about the run: megatron-core's optional TE/apex, torch's own
    deprecations inside megatron-core and torch.distributed, transformers' "longer than the maximum length"
    (inputs are tokenized whole and then cut or refused), a GPU-only tuning hint on CPU machines."""
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*is deprecated.*")
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    # megatron-core logs a failed checkpoint write before raising it; the error is reported once, in one line
    import logging

    logging.getLogger("megatron.core.dist_checkpointing").setLevel(logging.CRITICAL)
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_tool(run: Callable[[Optional[list[str]]], Any], argv: Optional[list[str]] = None) -> int:
    """Run `run(argv)` in the shell (module docstring); returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_third_party()
    try:
        run(argv)
    except SystemExit as exc:  # argparse's --help (0); a tool may also end early with a code
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_FAILURE)
    except UserError as exc:
        print_error(one_line(exc))
        return EXIT_USAGE
    except ToolFailure as exc:
        print_error(one_line(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt as exc:  # a message says what was kept
        print_error("interrupted" + (f" ({one_line(exc)})" if str(exc) else ""))
        return EXIT_INTERRUPTED
    return EXIT_OK


# ---- progress ----------------------------------------------------------------------------------------------
class Progress:
    """A tqdm bar on a terminal; elsewhere (a scheduler's log, a pipe) one line `desc: n/total (p%) elapsed`
    every `interval` seconds and at the end, so a job shows where it is. Use as a context manager or call
    close(); `update(n)` like tqdm."""

    def __init__(self, total: Optional[int] = None, desc: str = "", unit: str = "it",
                 interval: float = PROGRESS_INTERVAL_S, stream=None, disable: bool = False):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.stream = stream or sys.stderr
        self.n, self.disable = 0, disable
        self.start = self._last = time.monotonic()
        self._bar = None
        if not disable and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif not self.disable and time.monotonic() - self._last >= self.interval:
            self._line()

    def _line(self) -> None:
        self._last = time.monotonic()
        done = f"{self.n:,}" + (f"/{self.total:,} ({100 * self.n / max(self.total, 1):.0f}%)" if self.total else "")
        print(f"{self.desc}: {done} {self.unit}, {self._last - self.start:.0f} s", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif not self.disable and self.n:
            self._line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable, total: Optional[int] = None, desc: str = "", unit: str = "it",
             interval: float = PROGRESS_INTERVAL_S, disable: bool = False):
    """Iterate `iterable` with a Progress (tqdm on a terminal, timed lines elsewhere)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, desc, unit, interval, disable=disable) as bar:
        for item in iterable:
            yield item
            bar.update()
