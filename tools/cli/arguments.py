"""argparse types that check a value where it is parsed, so a bad flag is a usage line, not a traceback.

Every stage script uses these for counts, sizes, fractions, booleans and scale lists; argparse turns
an ``ArgumentTypeError`` into ``<script>: error: argument --flag: <message>`` and exit status 2.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, Sequence

GIVEN_FLAGS = "_given_flags"  # private attribute of a parsed namespace: the dests set on the command line
TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")


class UsageError(ValueError):
    """Flags that are fine one by one but not together (found after parsing): exit status 2."""


Check = Callable[[argparse.Namespace], "str | None"]


class StageArgumentParser(argparse.ArgumentParser):
    """The parser of every stage script: reads ``@file.args`` (one flag or value per line, so an
    ablation is a small file), shows the script's docstring as written, and runs the checks added with
    ``add_check`` after parsing, turning a problem into a usage error that names the flags."""

    def __init__(self, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(fromfile_prefix_chars="@", **kwargs)
        self._checks: list[Check] = []

    def add_check(self, check: Check) -> None:
        """``check(args)`` returns a message when the parsed flags do not fit together, else None."""
        self._checks.append(check)

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        parsed = super().parse_args(args, namespace)
        for check in self._checks:
            problem = check(parsed)
            if problem:
                self.error(problem)
        setattr(parsed, GIVEN_FLAGS, self._given(args))
        return parsed

    def _given(self, args: Sequence[str] | None) -> tuple[str, ...]:
        """The dests that the command line (or an ``@file``) sets: argparse applies no default to an
        attribute the namespace already has, so in a namespace of ``unset`` sentinels the dests that
        still hold the sentinel after parsing were not given. The sentinel is an (empty) list, so that a
        repeatable flag (``action="append"``), which appends to a copy of the value it finds, works too."""
        unset = _Unset()
        probe = argparse.Namespace(**{action.dest: unset for action in self._actions
                                      if action.dest != argparse.SUPPRESS})
        super().parse_known_args(args, probe)
        return tuple(sorted(dest for dest, value in vars(probe).items() if value is not unset))


class _Unset(list):
    """``StageArgumentParser._given``'s sentinel: a value no flag has set."""


def given_flags(args: argparse.Namespace) -> frozenset[str]:
    """The dests set on the command line of a ``StageArgumentParser`` run (empty for other namespaces)."""
    return frozenset(getattr(args, GIVEN_FLAGS, ()))


def parse_bool(text: str) -> bool:
    """``True`` / ``False`` (also 1/0, yes/no, any case), as the original's ``str2bool``; anything else,
    a typo such as ``Flase`` included, is an error rather than a silent False."""
    lowered = text.strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _number(text: str, kind: Callable[[str], float | int]) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, epochs, iterations, crop sizes, jobs)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (DataLoader workers, CRF iterations)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (no nan / inf)."""
    return float(_number(text, float))


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, walk powers)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (weight decay, loss weights, momentum)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def fraction(text: str) -> float:
    """A number in ``[0, 1]`` (``--start``/``--end`` shares of a list, score thresholds)."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def parse_scales(text: str) -> tuple[float, ...]:
    """A comma-separated list of positive, finite scales: ``'0.5,1.0'`` -> ``(0.5, 1.0)``."""
    parts = [part.strip() for part in text.split(",")]
    try:
        scales = tuple(float(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(scale) and scale > 0 for scale in scales):
        raise argparse.ArgumentTypeError(f"scales must be positive finite numbers, got {text!r}")
    return scales


def add_shard_args(parser: StageArgumentParser) -> None:
    """``--start`` / ``--end``: the share ``[start, end)`` of the id list this run takes (the original's flags)."""
    parser.add_argument("--start", type=fraction, default=0.0, help="fraction of the list where this run starts")
    parser.add_argument("--end", type=fraction, default=1.0, help="fraction of the list where this run ends")
    parser.add_check(lambda args: None if args.start < args.end
                     else f"--start {args.start} must be below --end {args.end}")
