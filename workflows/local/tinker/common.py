"""What every part of the stand-in shares: its errors, its logger and its limits."""

from __future__ import annotations

from jobs.log import get_logger

API = "/api/v1"
# a checkpoint's time to live, as the SDK documents it (SaveWeightsRequest.ttl_seconds): 1 hour to 10 years
TTL_RANGE = (3600, 10 * 365 * 86400)


class UserError(Exception):
    """A request this server cannot serve: 400 when the route answers at once, else its future fails with
    category "user" (the SDK retries neither)."""


class Cancelled(Exception):
    """Raised between two forward passes of an engine when nobody waits for the work any more (every client of
    the batch went away) or the server is stopping."""


def log():
    return get_logger("tinker-server")


def check_ttl(ttl) -> int | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not TTL_RANGE[0] <= ttl <= TTL_RANGE[1]:
        raise UserError(f"ttl_seconds must be an integer from {TTL_RANGE[0]} (1 hour) to {TTL_RANGE[1]} (10 years), "
                        f"or null for no expiry; not {ttl!r}")
    return ttl
