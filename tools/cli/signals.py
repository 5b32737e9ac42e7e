"""Signal handlers installed for a block and restored after it: the one way the training engine, the stage
runner and the preflight take over SIGINT / SIGTERM / SIGHUP."""
from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import FrameType

Handler = Callable[[int, FrameType | None], object]


@contextmanager
def handled(numbers: Iterable[signal.Signals], handler: Handler) -> Iterator[None]:
    """Run the block with ``handler`` for the signals ``numbers``, then put back the handlers there were."""
    numbers = tuple(numbers)
    previous = {number: signal.getsignal(number) for number in numbers}
    for number in numbers:
        signal.signal(number, handler)
    try:
        yield
    finally:
        for number, handler_before in previous.items():
            signal.signal(number, handler_before)
