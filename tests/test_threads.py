"""CPU threads from the cores a process may use; OpenMP's wait policy set before torch loads; env.json records both."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, tiny_cfg

from medtune import threads


@pytest.fixture
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _cgroup(tmp_path, **files):
    for name, text in files.items():
        path = tmp_path / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_usable_cores_follow_the_affinity_and_the_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    found = threads.usable_cores(_cgroup(tmp_path / "v2", **{"cpu.max": "150000 100000\n"}))
    assert found["cgroup_quota"] == 1.5 and found["cores"] == min(affinity, 2)  # 1.5 cores keep 2 threads busy
    found = threads.usable_cores(_cgroup(tmp_path / "half", **{"cpu.max": "50000 100000\n"}))
    assert found["cores"] == 1
    assert threads.usable_cores(_cgroup(tmp_path / "max", **{"cpu.max": "max 100000\n"}))["cores"] == affinity
    v1 = _cgroup(tmp_path / "v1", **{"cpu__cpu.cfs_quota_us": "100000\n", "cpu__cpu.cfs_period_us": "100000\n"})
    assert threads.usable_cores(v1) == {"cores": 1, "affinity": affinity, "cgroup_quota": 1.0}
    v1_unlimited = _cgroup(tmp_path / "v1u", **{"cpu__cpu.cfs_quota_us": "-1\n", "cpu__cpu.cfs_period_us": "100000\n"})
    assert threads.usable_cores(v1_unlimited)["cores"] == affinity


@pytest.mark.parametrize("cores, load, idle", [(2, 0.2, 2), (2, 1.4, 1), (2, 6.5, 1), (8, 2.6, 5), (4, 0.0, 4)])
def test_idle_cores_leave_out_what_other_work_keeps_busy(cores, load, idle):
    assert threads.idle_cores(cores, load) == idle


def test_train_threads_then_omp_num_threads_then_the_idle_usable_cores(monkeypatch, keep_torch_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    chosen = threads.apply_threads(2)
    assert chosen["torch_threads"] == torch.get_num_threads() == 2 and chosen["threads_source"] == "train.threads"
    chosen = threads.apply_threads(None)
    assert chosen["torch_threads"] == 1 and chosen["threads_source"] == "OMP_NUM_THREADS"
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "usable_cores", lambda: {"cores": 4, "affinity": 4, "cgroup_quota": None})
    monkeypatch.setattr(threads, "idle_cores", lambda cores: 3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert threads.apply_threads(None)["torch_threads"] == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two launched processes share the idle cores
    assert threads.apply_threads(None)["torch_threads"] == 1


def _wait_policy_in_fresh_python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(REPO / "src")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_wait_policy_is_set_only_before_torch_loads():
    show = "import os; from medtune import threads; print(os.environ.get('OMP_WAIT_POLICY'), '|', threads._policy_origin)"
    before = _wait_policy_in_fresh_python("from medtune.threads import prepare_openmp; prepare_openmp(); " + show)
    assert before == "PASSIVE | medtune"
    after = _wait_policy_in_fresh_python("import torch; from medtune.threads import prepare_openmp; prepare_openmp(); "
                                         + show)
    assert after.startswith("None | unset")
    # the `medtune` command sets it before it imports anything that imports torch
    cli = _wait_policy_in_fresh_python("import sys; import medtune.cli as c; c.build_parser = None\n"
                                       "try:\n    c.main(['--help'])\nexcept Exception:\n    pass\n" + show)
    assert cli == "PASSIVE | medtune"


def test_env_json_records_the_threads_a_run_used(tmp_path, keep_torch_threads):
    from medtune.train.sft import train

    run = train(tiny_cfg(tmp_path, "train.threads=1", "train.preflight=false", "train.log_mfu=false", steps=1))
    env = json.loads((run / "env.json").read_text())
    assert env["torch_threads"] == 1 and env["threads_source"] == "train.threads"
    assert env["interop_threads"] >= 1 and env["usable_cores"]["cores"] >= 1
    assert "omp_wait_policy" in env and "omp_wait_policy_origin" in env


def test_a_resumed_run_keeps_the_thread_count_of_its_first_session(tmp_path, monkeypatch):
    """Another thread count splits CPU sums differently, so a resume keeps the recorded one (bit-exact continuation)
    unless train.threads or OMP_NUM_THREADS says otherwise."""
    import json

    import torch

    from medtune.threads import keep_run_threads

    before = torch.get_num_threads()
    env = tmp_path / "env.json"
    env.write_text(json.dumps({"torch_threads": 1}))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        kept = keep_run_threads(None, env)
        assert torch.get_num_threads() == 1 and kept["threads_source"].endswith("(the run's first session)")
        torch.set_num_threads(2)
        assert keep_run_threads(3, env) is None and torch.get_num_threads() == 2  # train.threads wins
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert keep_run_threads(None, env) is None
        assert keep_run_threads(None, tmp_path / "absent.json") is None
    finally:
        torch.set_num_threads(before)
