"""The thread layout's unset settings resolve from the CPUs and ``workers``; a lone request to an
idle model runs as concurrent slices on real sessions and answers as if each text ran alone."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

import server.settings
from server.dataplane import DataPlane
from server.registry import Registry
from server.settings import Settings
from tests.server.conftest import copy_repo
from tests.server.test_in_flight import mixed_texts
from tests.server.test_registry import only, settings, with_registry


@pytest.fixture
def two_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server.settings, "available_cpus", lambda: 2)


def layout(cfg: Settings) -> tuple[int, int, int]:
    """(intra-op threads, inter-op threads, idle split) as the registry uses them."""
    threads = cfg.thread_layout()
    return threads.intra_op_threads, threads.inter_op_threads, threads.idle_split


@pytest.mark.usefixtures("two_cpus")
def test_unset_threads_follow_the_cpus_and_workers() -> None:
    assert layout(Settings(_env_file=None)) == (2, 1, 1)  # one process: TensorFlow splits ops
    assert layout(Settings(_env_file=None, workers=2)) == (1, 2, 2)  # one core per batch
    assert layout(Settings(_env_file=None, workers=4)) == (1, 2, 2)


@pytest.mark.usefixtures("two_cpus")
def test_set_values_win(monkeypatch: pytest.MonkeyPatch) -> None:
    assert layout(Settings(_env_file=None, workers=2, intra_op_threads=2)) == (2, 1, 1)
    assert layout(Settings(_env_file=None, intra_op_threads=1)) == (1, 2, 2)
    assert layout(Settings(_env_file=None, intra_op_threads=0)) == (0, 1, 1)  # TF's own pools
    # a set inter-op count bounds the split: more slices would only queue for its threads
    assert layout(Settings(_env_file=None, intra_op_threads=1, inter_op_threads=1)) == (1, 1, 1)
    monkeypatch.setenv("TEXTSERVE_IDLE_SPLIT", "1")
    monkeypatch.setenv("TEXTSERVE_INTER_OP_THREADS", "3")
    assert layout(Settings(_env_file=None, workers=2)) == (1, 3, 1)


def test_the_unset_split_stays_small_on_big_machines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server.settings, "available_cpus", lambda: 64)
    assert layout(Settings(_env_file=None, workers=64)) == (1, 8, 8)
    assert layout(Settings(_env_file=None)) == (64, 1, 1)
    # the k8s ConfigMap's pod: 2 intra-op threads, 1 inter-op thread, on a 64-CPU node
    assert layout(Settings(_env_file=None, intra_op_threads=2, inter_op_threads=1)) == (2, 1, 1)


def test_cpus_are_the_affinity_bounded_by_a_cgroup_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert server.settings.available_cpus(tmp_path) == affinity  # no cgroup files: no quota
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert server.settings.cgroup_cpu_quota(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    assert server.settings.cgroup_cpu_quota(v1) == 0.5
    assert server.settings.available_cpus(v1) == 1  # half a CPU still runs one thread
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("max 100000\n")
    assert server.settings.cgroup_cpu_quota(v2) is None
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert server.settings.available_cpus(v2) == min(affinity, 2)
    (v2 / "cpu.max").write_text("garbage\n")
    assert server.settings.cgroup_cpu_quota(v2) is None


def test_a_lone_request_runs_in_slices_and_answers_as_texts_alone(
    small_repo: Path, tmp_path: Path
) -> None:
    repo = copy_repo(small_repo, tmp_path / "repo")
    only(repo, noun={"base_path": "noun-topic"})
    texts = mixed_texts()

    def split_threads() -> int:
        return sum(t.name.startswith("textserve-split") for t in threading.enumerate())

    async def body(registry: Registry) -> None:
        plane = DataPlane(registry, registry.settings)
        mv = registry.get("noun")
        assert mv.runtime is not None
        before = split_threads()
        got = await plane.probabilities(mv, texts)
        assert split_threads() == before + 1, "the second slice ran on the split executor"
        want = np.concatenate(
            [mv.runtime.predict(mv.runtime.tokenizer.encode_batch([t])) for t in texts]
        )
        np.testing.assert_allclose(got, want, atol=1e-5)

    cfg = settings(repo, intra_op_threads=1, inter_op_threads=2, idle_split=2, max_wait_ms=0.0)
    with_registry(cfg, body)
