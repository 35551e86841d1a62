"""How a run decides on fetch processes and shares its threads between them (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from etl.config import ApiConfig
from etl.fetchprocs import AUTO_MIN_ACCOUNTS, processes_for, split


@pytest.mark.parametrize(
    ("total", "parts", "shares"),
    [(8, 2, [4, 4]), (5, 2, [3, 2]), (16, 3, [6, 5, 5]), (1, 4, [1]), (2, 2, [1, 1])],
)
def test_split__shares_every_thread_and_gives_each_process_one(
    total: int, parts: int, shares: list[int]
) -> None:
    """api.concurrency is the total: the shares add up to it and none is empty."""
    assert split(total, parts) == shares
    assert sum(shares) == total


def api(**values: Any) -> ApiConfig:
    return ApiConfig.model_validate(
        {"api_key": "k", "concurrency": 16, "max_requests_per_s": 10_000, **values}
    )


BIG = AUTO_MIN_ACCOUNTS * 4


@pytest.mark.parametrize(
    ("settings", "accounts", "cores", "processes"),
    [
        ({}, BIG, 2, 2),  # a big, fast run: one per core
        ({}, BIG, 8, 8),
        ({"concurrency": 3}, BIG, 8, 3),  # never more processes than threads
        ({}, BIG, 1, 0),  # one core: processes would only compete for it
        ({"concurrency": 1}, BIG, 8, 0),
        ({}, AUTO_MIN_ACCOUNTS - 1, 8, 0),  # starting processes costs more than it saves
        ({"max_requests_per_s": 3}, BIG, 8, 0),  # the budget, not the CPU, is the limit
        ({"fetch_processes": 0}, BIG, 8, 0),  # asked for explicitly
        ({"fetch_processes": 3}, 10, 1, 3),
        ({"fetch_processes": 6, "concurrency": 4}, 10, 8, 4),
    ],
)
def test_processes_for__auto_uses_cores_only_for_big_fast_runs(
    settings: dict[str, Any], accounts: int, cores: int, processes: int
) -> None:
    """'auto' starts fetch processes where one process would be the limit; a number is kept."""
    assert processes_for(api(**settings), accounts, cores) == processes
