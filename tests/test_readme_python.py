"""README's Python example works as written: saved as example.py and run, against a real master and agent."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.cluster import REPO, Cluster


def readme_example() -> str:
    python = (REPO / "README.md").read_text().split("## Python\n", 1)[1]
    block = re.search(r"```python\n(.*?)```", python, re.S)
    assert block is not None
    return block.group(1)


def test_the_five_line_pool_example_runs_as_written(cluster: Cluster, tmp_path: Path) -> None:
    code = readme_example()
    assert code.startswith("from corral import Pool\n") and len(code.strip().splitlines()) == 5
    (tmp_path / "example.py").write_text(code)
    cluster.start_agent("a", slots=2)
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=cluster.env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]\n"
    with cluster.client() as c:  # it ran on the agent, shipped (the agent cannot import example.py by name)
        jobs = c.jobs(limit=10)
    assert jobs and all(j["func"] == "example:square" and j["agent"] == "a" and j["state"] == "done" for j in jobs)
