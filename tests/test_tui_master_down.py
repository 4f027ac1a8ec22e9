"""The console's header says at once when it loses its master: a red "master down" with the address and since
when, in the pilot and on screen; green "master up" again once the master is back and the console re-attached."""

from __future__ import annotations

import re
import signal
import time

from rich.text import Text

from corral.console.tui.app import CorralApp
from corral.console.tui.widgets.stats import StatsHeader
from tests.cluster import Cluster
from tests.test_tui_app import SIZE, loaded, main, until


def style_of(text: Text, needle: str) -> str:
    """The style of the span that starts where `needle` does in `text`."""
    at = text.plain.index(needle)
    return " ".join(str(span.style) for span in text.spans if span.start <= at < span.end)


async def test_master_down_is_red_with_its_address_and_green_again(cluster: Cluster) -> None:
    host, port = cluster.address()
    app = CorralApp(home=cluster.home)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        header = main(app).query_one(StatsHeader)
        assert "● master up" in header.status_text().plain
        assert "green" in style_of(header.status_text(), "● master up")
        before = time.time()
        cluster.master.send_signal(signal.SIGKILL)
        cluster.master.wait(timeout=10)
        await until(pilot, lambda: "master down" in header.status_text().plain, "the header to say master down")
        line = header.status_text()
        found = re.search(rf"✕ master down at {re.escape(host)}:{port} since (\d\d:\d\d:\d\d)", line.plain)
        assert found, line.plain
        # Since when: the moment it was lost, on this machine's clock (to the second).
        lost = time.strptime(found.group(1), "%H:%M:%S")
        at = time.localtime(header.lost_since)
        assert (lost.tm_hour, lost.tm_min, lost.tm_sec) == (at.tm_hour, at.tm_min, at.tm_sec)
        assert before - 1 <= header.lost_since <= time.time()
        assert "red" in style_of(line, "✕ master down")
        # What the terminal shows, not only the widget's text.
        assert "master down at" in "".join(str(s.text) for s in header.render_lines(header.region)), "on screen"
        cluster.start_master()
        await until(pilot, lambda: app.connected and "● master up" in header.status_text().plain,
                    "the header green again after re-attaching")
        assert "master down" not in header.status_text().plain
        assert "green" in style_of(header.status_text(), "● master up")
