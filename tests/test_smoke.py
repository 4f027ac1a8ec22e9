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


def test_agents_without_names_on_one_host_get_distinct_names(cluster: Cluster) -> None:
    """The seed's scenario starts two agents with no --name: both must serve, not fight over one name."""
    import subprocess
    import sys

    from tests.cluster import REPO, wait_until

    procs = [subprocess.Popen([sys.executable, "-m", "corral.agent", "--slots", "1"], env=cluster.env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    cluster.agents.update({f"unnamed{i}": p for i, p in enumerate(procs)})
    with cluster.client() as c:
        names = wait_until(lambda: sorted(a["name"] for a in c.agents() if a["state"] == "up")
                         if len(c.agents()) == 2 else None, what="two agents")
        host = names[0]
        assert names == sorted([host, f"{host}-2"])
        ids = c.submit_command("sleep 0.3", ), c.submit_command("sleep 0.3")
        c.wait(list(ids), timeout=20)
        assert {c.job(j)["agent"] for j in ids} == set(names)
    duplicate = cluster.corral("agent", "--name", names[0], "--slots", "1")
    assert duplicate.returncode == 2
    assert duplicate.stderr.strip().count("\n") == 0
    assert f"an agent named '{names[0]}' is already connected" in duplicate.stderr
