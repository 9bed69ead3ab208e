"""Small versions of `make bench`: each benchmark runs end to end as its own command (its own
Temporal dev server and PostgreSQL, as `make bench` runs it), exits 0 and reports what it
measured. No figure is judged here (shared machines are noisy); what is judged is that the
run did the work it claims to measure."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from bench.common import TERMINATED

pytestmark = pytest.mark.slow


def run_bench(module: str, results: Path, *args: str, **env: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", f"bench.{module}", "--quick", *args], capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, **env, "BENCH_RESULTS_DIR": str(results)})
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads((results / f"{module}.json").read_text())
    return result


def test_refund_throughput_smoke_warms_every_variant_and_rotates_the_order(tmp_path: Path) -> None:
    result = run_bench("refund_throughput", tmp_path)
    assert len(result["rows"]) == 4  # bare 9-activity baseline, bare new shape, both sandboxes
    auto, approval = result["auto_approved_history"], result["one_approval_history"]
    # ran end to end: validated (local), submitted, settled (the local write that queues the notice)
    assert auto["activities"] >= 1 and auto["local_activities"] >= 2
    assert approval["events"] > auto["events"] == result["events_per_refund"]["auto_approved"]
    # counted with the late-failure watch the product holds after a success (a timer); the
    # waves' refunds run without it, and their histories were what was counted
    assert auto["timers"] >= 1 and approval["timers"] >= 1 and result["wave_history"]["timers"] == 0
    assert auto["events"] > result["events_per_refund_in_waves"]["auto_approved"]
    assert all(row["per_second"] > 0 for row in result["rows"])
    assert set(result["warm_up_seconds"]) == {"bare", "bare_new", "passthrough", "default"}
    assert [order[0] for order in result["round_orders"]] == ["bare", "bare_new"]
    assert all(len(seconds) == 2 for seconds in result["round_seconds"].values())
    assert result["bare_runner"].startswith("workers.main.workflow_runner()")
    cpu = result["cpu_ms_per_workflow"]  # each variant's own worker worked, the others idled
    assert cpu["passthrough"]["worker: passthrough"] > 10 * cpu["passthrough"]["worker: default"]
    assert cpu["bare"]["worker: bare"] > cpu["bare"]["worker: passthrough"]
    assert all(cpu[v]["temporal dev server"] > 0 for v in cpu) and cpu["passthrough"]["postgresql"] > 0
    assert cpu["bare"]["postgresql"] < cpu["bare"]["worker: bare"] / 2  # bare workflows write no rows


def test_webhook_ingest_smoke_sees_one_signal_per_workflow_and_none_from_duplicates(tmp_path: Path) -> None:
    result = run_bench("webhook_ingest", tmp_path, "--pin")
    assert result["placement"].startswith("Temporal dev server on core") or len(os.sched_getaffinity(0)) < 2
    assert result["workflows_started"] == result["events"] == 20
    assert result["deliveries"] == 240  # 12 copies of each event
    assert result["signals_received_per_workflow"] == {"1": 20}  # read from the histories
    assert result["first_verdicts"] == ["accepted"] and result["duplicate_verdicts"] == ["duplicate"]
    assert result["ingest_ratio"] > 0 and result["duplicate_cost_ratio"] > 0
    # then 5 events with their 12 copies sent at once: no duplicate reached Temporal
    assert (result["racing_events"], result["racing_deliveries"]) == (5, 60)
    assert result["racing_verdicts"] == ["accepted", "duplicate"]
    assert result["racing_duplicates_reaching_temporal"] == 0
    assert result["racing_signals_received_per_workflow"] == {"1": 5}


def test_open_cases_smoke_compares_the_same_activities_at_the_same_concurrency(tmp_path: Path) -> None:
    result = run_bench("open_cases", tmp_path, REFUNDS_WORKER_STICKY_QUEUE_TIMEOUT_SECONDS="37")
    assert result["cases"] == 30
    assert result["worker_tuning"]["worker_sticky_queue_timeout_seconds"] == 37  # the run says what it ran
    assert result["baseline_activities"] == result["activities_after_approval"] >= 1  # the submit
    assert result["baseline_local_activities"] == result["local_activities_after_approval"] >= 1
    assert [(r["workflows"], r["first"]) for r in result["rounds"]] == [
        (10, "bare"), (10, "approve"), (10, "bare")]  # a wave each, alternating
    assert result["workflow_tasks"]["bare"] == result["baseline_activities"] + 1  # its start, then one each
    assert result["completion_ratio"] > 0 and result["rss_waiting_mib"] > 0
    assert set(result["workflow_task_trouble"]) == {"timed_out", "failed", "cases_with_any",
                                                    "activities_timed_out", "timed_out_on_sticky_queue"}
    # the kernel's high-water mark, well above the idle worker's after 30 cases, and the peak
    # never below it (nor below a sample: the mark can trail one by a few pages)
    assert result["rss_high_water_mib"] > result["rss_idle_mib"]
    assert result["rss_peak_mib"] >= max(result["rss_high_water_mib"], result["rss_waiting_mib"])


def test_reconciliation_smoke_finds_every_planted_break(tmp_path: Path) -> None:
    result = run_bench("reconciliation", tmp_path)
    assert [(r["run"], r["objects"], r["planted"]) for r in result["rows"]] == [
        ("warm-up", 200, 1), ("baseline", 200, 1), ("measured", 2_000, 2)]
    assert [r["breaks"] for r in result["rows"]] == [1, 1, 2]  # the bench itself exits 1 otherwise


def test_a_benchmark_stopped_with_sigterm_stops_what_it_started(tmp_path: Path) -> None:
    """SIGTERM (a CI timeout, `kill`) to a benchmark once its stack runs: its dev server,
    PostgreSQL and worker processes stop with it and its temporary folder goes; before, all
    of them kept running on the shared machine."""
    log = tmp_path / "stderr.log"
    # its temporary folder on a short path: PostgreSQL's socket path has a length limit
    with tempfile.TemporaryDirectory(prefix="bench-term-") as folder, log.open("wb") as stderr:
        bench = subprocess.Popen([sys.executable, "-m", "bench.refund_throughput", "--quick"],
                                 stdout=subprocess.DEVNULL, stderr=stderr,
                                 env={**os.environ, "TMPDIR": folder, "BENCH_RESULTS_DIR": str(tmp_path)})
        started = _stack_of(bench, folder)
        try:
            assert bench.poll() is None, f"it ended before its stack was up: {log.read_text()[-3000:]}"
            assert any(p.name() == "postgres" for p in started) and len(started) >= 5
            bench.send_signal(signal.SIGTERM)
            assert bench.wait(timeout=120) == TERMINATED, log.read_text()[-3000:]
            _, alive = psutil.wait_procs(started, timeout=10)
            assert [p.name() for p in alive] == []
            assert [*Path(folder).glob("refunds-bench-*")] == []
        finally:
            for survivor in started:
                with contextlib.suppress(psutil.Error):
                    survivor.kill()


def _stack_of(bench: subprocess.Popen[bytes], folder: str) -> list[psutil.Process]:
    """The processes a benchmark started, once its three workers and dev server run (or it
    ended): PostgreSQL is started through pg_ctl, nobody's child, so it is found by its data
    folder."""
    started: list[psutil.Process] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and bench.poll() is None:
        started = psutil.Process(bench.pid).children(recursive=True) + [
            p for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "postgres" and folder in " ".join(p.info["cmdline"] or [])]
        with contextlib.suppress(psutil.Error):
            commands = [" ".join(p.cmdline()) for p in started]
            workers = sum("bench.worker_process" in c for c in commands)
            if workers == 3 and any("start-dev" in c for c in commands):
                break
        time.sleep(0.2)
    return started
