"""The console keeps mttl's own lines; Ray workers' and libraries' lines go to the run's log file."""

from __future__ import annotations

import logging

from mttl import console


def test_worker_lines_go_to_the_file_and_only_ours_to_the_console(tmp_path, monkeypatch, capsys):
    log = tmp_path / "internal.log"
    monkeypatch.setitem(console._state, "path", log)
    monkeypatch.setitem(console._state, "file", open(log, "a", encoding="utf-8", buffering=1))
    console._handle_worker_output({"actor_name": "RayTrainWorker", "pid": 42, "is_err": False, "lines": [
        "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/x)",
        "[mttl] step 5/10  loss 5.9272  184 tokens/s  ETA 0m03s",
    ]})
    console._handle_worker_output({"task_name": "ReadParquet", "pid": 7, "is_err": True, "lines": ["Traceback x"]})
    console._state["file"].close()
    assert capsys.readouterr().out.splitlines() == ["[mttl] step 5/10  loss 5.9272  184 tokens/s  ETA 0m03s"]
    assert log.read_text().splitlines() == [
        "(RayTrainWorker pid=42) Checkpoint successfully created at: Checkpoint(filesystem=local, path=/x)",
        "(RayTrainWorker pid=42) [mttl] step 5/10  loss 5.9272  184 tokens/s  ETA 0m03s",
        "(ReadParquet pid=7) Traceback x",
    ]


def test_verbose_leaves_everything_on_the_console(tmp_path):
    before = {name: list(logging.getLogger(name).handlers) for name in console.LIBRARY_LOGGERS}
    assert console.send_internal_logs_to(tmp_path / "internal.log", verbose=True) is None
    assert not (tmp_path / "internal.log").exists()
    assert {name: list(logging.getLogger(name).handlers) for name in console.LIBRARY_LOGGERS} == before


def test_library_loggers_move_to_the_file(tmp_path, monkeypatch, capsys):
    logger = logging.getLogger("ray.tune")
    saved = list(logger.handlers)
    import sys
    logger.addHandler(logging.StreamHandler(sys.stderr))
    log = tmp_path / "internal.log"
    monkeypatch.setitem(console._state, "path", log)
    monkeypatch.setitem(console._state, "file", open(log, "a", encoding="utf-8", buffering=1))
    try:
        console._quiet_library_loggers()
        logger.warning("trial chatter")
        assert "trial chatter" not in capsys.readouterr().err
        assert "WARNING ray.tune: trial chatter" in log.read_text()
    finally:
        logger.handlers[:] = saved
        console._state["file"].close()


def test_the_quick_starts_tagged_lines_pass():
    assert (console.worker_line_for_console("x [quickstart] run-ft-mhr: t1 done in 3s")
            == "[quickstart] run-ft-mhr: t1 done in 3s")
    assert console.worker_line_for_console("Reporting training result 1: TrainingReport(...)") is None
