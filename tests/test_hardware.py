"""Resident-memory sampling: the current RSS, its parts on Linux, and the peak a block of code adds."""

from __future__ import annotations

import sys
import time

import pytest

from fusionzoo.hardware import RssSampler, memory_status, rss_bytes, rss_is_current


def test_rss_now_and_by_kind() -> None:
    assert rss_is_current()  # Linux /proc or psutil: the test machines have one of them
    rss = rss_bytes()
    assert rss > 10 * 2**20
    status = memory_status()
    assert status["VmRSS"] > 10 * 2**20 and abs(status["VmRSS"] - rss) < 64 * 2**20
    if sys.platform.startswith("linux"):
        assert {"RssAnon", "RssFile", "RssShmem", "private"} <= set(status)
        assert status["private"] == status["RssAnon"] + status["RssShmem"]


@pytest.mark.parametrize("by_kind", [False, True])
def test_sampler_sees_a_peak_that_is_gone_by_the_end(by_kind: bool) -> None:
    with RssSampler(interval_s=0.001, by_kind=by_kind) as sampler:
        block = bytearray(200 * 2**20)  # 200 MiB, touched page by page
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(0.05)
        del block
    assert sampler.increase() > 150 * 2**20
    assert rss_bytes() < sampler.peak["VmRSS"]
    if by_kind and sys.platform.startswith("linux"):
        assert sampler.increase("private") > 150 * 2**20 and "RssFile" in sampler.start
    sampler.reset()
    assert sampler.increase() == 0
