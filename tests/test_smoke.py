"""The seed's scenario: a master, two agents, 30 jobs spread over both, every output back."""

from __future__ import annotations

from tests.cluster import Cluster


def test_seed_scenario_two_agents(cluster: Cluster) -> None:
    cluster.start_agent("alpha", slots=4)
    cluster.start_agent("beta", slots=4)
    done = cluster.corral("submit", "--count", "30", "--wait", "--", "sh", "-c", "sleep 0.2; echo $CORRAL_INDEX")
    assert done.returncode == 0, done.stderr
    assert sorted(int(line) for line in done.stdout.split()) == list(range(30))
    with cluster.client() as c:
        jobs = c.jobs(limit=100)
    by_agent = {j["agent"] for j in jobs}
    assert by_agent == {"alpha", "beta"}
    assert "Run job:" in cluster.agent_log("alpha") and "Run job:" in cluster.agent_log("beta")
    master_log = (cluster.logs / "master.log").read_text()
    assert "finished" not in master_log  # the master prints events only with -v
