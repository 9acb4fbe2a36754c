"""The benchmark harness, run once in its smoke configuration so that it cannot rot.

No timing is asserted: CI must not fail on a slow or busy machine. What is checked is that one
command starts everything, measures every section, stops everything, prints the table and writes
JSON in which every section has numbers (the real Infinity section is skipped in a smoke run).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import ROOT, strict_environment

pytestmark = pytest.mark.slow

BASELINE_PACKAGES = ("fastapi", "uvicorn", "requests")  # bench/naive_baseline.py
MEASURED_SECTIONS = ("footprint", "latency", "throughput", "naive", "scale", "speedups")
SMOKE_SECONDS = 120  # it takes about 20 s; a busy CI runner gets room


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    missing = [name for name in BASELINE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        message = f"the benchmark's baseline needs {missing}: pip install -r requirements-dev.txt"
        if strict_environment():
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("bench") / "latest.json"
    finished = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--smoke", "--out", str(out)],
                              capture_output=True, text=True, timeout=SMOKE_SECONDS)
    assert finished.returncode == 0, finished.stderr[-5000:]
    return json.loads(out.read_text()), finished.stdout


def numbers_in(value: Any) -> Iterator[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from numbers_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers_in(item)


def test_every_section_has_finite_numbers(smoke_run: tuple[dict[str, Any], str]) -> None:
    results, _ = smoke_run
    for section in MEASURED_SECTIONS:
        numbers = list(numbers_in(results[section]))
        assert numbers, f"section {section!r} has no numbers: {results[section]}"
        assert all(math.isfinite(n) for n in numbers), f"section {section!r} has a non-finite number"


def test_every_figure_is_a_median_with_its_range(smoke_run: tuple[dict[str, Any], str]) -> None:
    results, _ = smoke_run
    spreads = 0

    def check(value: Any) -> None:
        nonlocal spreads
        if isinstance(value, dict):
            if "median" in value:
                assert value["min"] <= value["median"] <= value["max"], value
                spreads += 1
            for item in value.values():
                check(item)
        elif isinstance(value, list):
            for item in value:
                check(item)

    check({section: results[section] for section in MEASURED_SECTIONS})
    assert spreads > 20


def test_each_measured_path_answered_without_failures(smoke_run: tuple[dict[str, Any], str]) -> None:
    results, _ = smoke_run
    for section in ("throughput", "naive"):
        for row in results[section]["rows"]:
            assert row["failed"] == 0, row
    for row in results["throughput"]["rows"]:
        assert row["direct_rps"]["median"] > 0 and row["proxy_rps"]["median"] > 0, row


def test_the_big_request_counts_its_upstream_calls(smoke_run: tuple[dict[str, Any], str]) -> None:
    results, _ = smoke_run
    documents = results["scale"]["documents"]
    for row in results["scale"]["batch_size_sweep"]["rows"]:
        assert row["big_upstream_calls"] == math.ceil(documents / row["batch_size"]), row


def test_the_real_infinity_section_is_skipped_in_a_smoke_run(smoke_run: tuple[dict[str, Any], str]) -> None:
    results, _ = smoke_run
    assert "skipped" in results["infinity"]


def test_the_table_is_printed_and_saved(smoke_run: tuple[dict[str, Any], str]) -> None:
    results, stdout = smoke_run
    assert results["table"] in stdout
    for heading in ("1. Added latency", "2. Throughput", "3. Against the naive design", "5. One request",
                    "6. Footprint", "Targets"):
        assert heading in stdout
    assert results["machine"]["nproc"] >= 1 and results["machine"]["python"]
    assert all(isinstance(target["met"], bool) for target in results["targets"])


def test_every_server_it_started_is_stopped(smoke_run: tuple[dict[str, Any], str]) -> None:
    results, _ = smoke_run
    assert len(results["servers"]) >= 5
    running = []
    for server in results["servers"]:
        try:
            if psutil.Process(server["pid"]).status() != psutil.STATUS_ZOMBIE:
                running.append(server)
        except psutil.NoSuchProcess:
            pass
    assert not running, f"the harness left servers running: {running}"


def test_the_server_logs_are_kept_beside_the_results(smoke_run: tuple[dict[str, Any], str]) -> None:
    results, _ = smoke_run
    assert any(log.name.endswith("proxy.log") for log in Path(results["logs"]).glob("*.log"))
