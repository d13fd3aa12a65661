"""The benchmark's closed loop of client processes against a real server on loopback."""

from __future__ import annotations

import threading
import time
from typing import Any

from server_helpers import query

from recserve.models import RecModel
from recserve.server import ServerThread
from recserve.server.bench import closed_loop_processes


def test_closed_loop_processes_say_when_their_window_opens(
    server: ServerThread, models: dict[str, RecModel]
) -> None:
    config = models["wnd"].config
    opened = threading.Event()
    result: dict[str, Any] = {}
    seen: list[float] = []

    def load() -> None:
        result.update(
            closed_loop_processes(
                "http", server.http_url, "wnd", config, [query(config, 8)], callers=2,
                seconds=1.0, processes=1, window_open=opened,
            )
        )  # fmt: skip

    loader = threading.Thread(target=load)
    loader.start()
    assert opened.wait(120), "the window never opened"
    seen.append(time.monotonic())
    loader.join(120)
    ended = time.monotonic()
    assert result["queries"] > 0 and result["errors"] == 0
    assert ended - seen[0] >= 0.8  # set as the timed second began, not after it
