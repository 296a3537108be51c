"""The service's limits, in one place, checked once when the service starts.

Every limit is what keeps one request (or a crowd of them) from taking the machine: ``workers`` bound
the work running at once, ``queue`` the work waiting, ``time_limit`` the seconds one request may hold a
worker, ``max_body_bytes`` and ``max_pixels`` the memory one request may make the service allocate,
``max_labels``, ``max_option_value`` and ``max_output_pixels`` the size of one explanation (samples,
masks, labels, and the maps it sends back).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

from ..errors import InvalidParameterError, InvalidParameterTypeError

#: the environment variable read for the token when ``--token`` is not given
TOKEN_ENV = "EXPLAINER_SERVE_TOKEN"


def available_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Settings:
    #: jobs running at once; "auto": one per available core
    workers: int | str = "auto"
    #: jobs admitted beyond the running ones; more are answered 503 with Retry-After; "auto": 4 per worker
    queue: int | str = "auto"
    #: seconds a request may take, waiting included; past it, 503 and the work is cancelled
    time_limit: float = 120.0
    #: largest request body (an upload, or base64 JSON); more is answered 413 before it is read
    max_body_bytes: int = 20 << 20
    #: largest image decoded (width x height), checked from its header before decoding
    max_pixels: int = 16_000_000
    #: most classes one explain request may ask maps for
    max_labels: int = 10
    #: the largest value any integer option may take (samples, masks, steps, features)
    max_option_value: int = 10_000
    #: most map pixels one explain answer may hold (maps x image pixels): bounds the response's size
    max_output_pixels: int = 40_000_000
    #: bearer token every /v1 request must carry; None: no token (then bind to loopback only)
    token: str | None = None

    def __post_init__(self):
        where = "serve"
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("workers", available_cores() if self.workers == "auto" else _int(where, "workers", self.workers, 1, 256))
        set_("queue", 4 * self.workers if self.queue == "auto" else _int(where, "queue", self.queue, 0, 100_000))
        if isinstance(self.time_limit, bool) or not isinstance(self.time_limit, (int, float)) \
                or not 0 < self.time_limit <= 86_400:
            raise InvalidParameterError(f"{where}: time_limit must be a number of seconds in (0, 86400]; "
                                        f"got {self.time_limit!r}.")
        set_("time_limit", float(self.time_limit))
        for name, low in (("max_body_bytes", 1024), ("max_pixels", 1), ("max_labels", 1), ("max_option_value", 1),
                          ("max_output_pixels", 1)):
            _int(where, name, getattr(self, name), low, 1 << 40)
        if self.token is not None and (not isinstance(self.token, str) or len(self.token) < 8
                                       or any(c.isspace() for c in self.token)):
            got = "a shorter one, or one with spaces" if isinstance(self.token, str) else type(self.token).__name__
            raise InvalidParameterError(f"{where}: token must be at least 8 characters without spaces; got {got}.")

    @property
    def admitted(self) -> int:
        """Jobs the service holds at most: running plus waiting."""
        return self.workers + self.queue

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["token"] = self.token is not None  # whether one is required, never the token
        return out


def _int(where: str, name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterTypeError(f"{where}: {name} must be an integer in [{low}, {high}]; got {value!r}.")
    if not low <= value <= high:
        raise InvalidParameterError(f"{where}: {name} must be an integer in [{low}, {high}]; got {value}.")
    return value
