"""The one backoff of the relay's outgoing requests (federation queues and push), and Retry-After."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Optional, Union

#: The longest `Retry-After` honoured (a day): a peer may slow its own queue, not freeze it.
MAX_RETRY_AFTER = 86400


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: the n-th failure in a row waits in [d/2, d],
    d = minimum * 2^(n-1) capped at maximum.

    Half the delay is random so peers that failed together do not retry together, and the
    other half keeps a failing peer from being retried at once.
    """

    minimum: float
    maximum: float
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.minimum <= self.maximum:
            raise ValueError(f"backoff needs 0 < minimum <= maximum, not {self.minimum}, {self.maximum}")

    def ceiling(self, failures: int) -> float:
        return min(self.maximum, self.minimum * (2 ** min(max(failures - 1, 0), 62)))

    def delay(self, failures: int, at_least: Optional[float] = None) -> float:
        """Seconds to wait after `failures` failures in a row (`at_least`: a Retry-After)."""
        ceiling = self.ceiling(failures)
        chosen = ceiling / 2 + self.rng.random() * ceiling / 2
        return chosen if at_least is None else max(chosen, at_least)


def parse_retry_after(value: Optional[Union[bytes, str]], now: float) -> Optional[float]:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), capped."""
    if not value:
        return None
    text = (value.decode("latin-1") if isinstance(value, bytes) else value).strip()
    try:
        seconds = float(int(text))
    except ValueError:
        try:
            seconds = parsedate_to_datetime(text).timestamp() - now
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)
