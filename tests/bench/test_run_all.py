"""bench/run_all.py on the CPU: the JSON's schema, reasons for every row not measured, the table of
docs/PERFORMANCE.md regenerated from the JSON (and nothing else of the doc touched), and a budget that
is never overrun — a section that does not fit is skipped, one that runs over is stopped."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from genssl.bench import run_all

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BUDGET_S = 30
SLACK_S = 5  # interpreter start before the budget's clock, exit after it


def _run(args: list[str], cwd: Path) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=BUDGET_S + 60)
    wall = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out, wall


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run_all")
    doc = tmp / "PERFORMANCE.md"
    shutil.copy(ROOT / "docs" / "PERFORMANCE.md", doc)
    before = doc.read_text()
    out, wall = _run(["--quick", "--budget-s", str(BUDGET_S), "--out-dir", str(tmp), "--doc", str(doc)], tmp)
    (path,) = tmp.glob("*-run-all-quick.json")
    return json.loads(path.read_text()), before, doc.read_text(), wall, out


def _ratio(row: dict) -> float:
    """The speed-up recomputed from the two medians (rates: ours / baseline; times: baseline / ours)."""
    b, o = row["baseline"]["median"], row["ours"]["median"]
    return o / b if row["ours"]["unit"].endswith("/s") else b / o


def _check_row(r: dict) -> None:
    assert r["status"] in ("ok", "skipped", "failed"), r
    assert {"id", "section", "what", "baseline", "ours", "ratio", "target", "reason", "extra"} <= set(r), r
    if r["status"] != "ok":
        assert isinstance(r["reason"], str) and len(r["reason"]) > 5, r
        return
    for side in (r["baseline"], r["ours"]):
        if side and side["repeats"]:  # the median of the row's own repeats
            assert side["median"] == statistics.median(side["repeats"]) and side["n"] == len(side["repeats"])
    if r["baseline"] and r["baseline"]["median"]:
        assert r["ratio"] == pytest.approx(_ratio(r)), r["id"]
    assert r["target"] is None, "GPU targets belong to rows at full sizes"


def test_json_schema(quick_run):
    report, *_ = quick_run
    assert report["schema"] == run_all.SCHEMA
    assert report["device"]["type"] == "cpu" and report["device"]["cores"] >= 1
    assert {"torch", "triton", "deepspeed", "dali", "diffusers", "tensorrt", "xformers"} <= set(report["versions"])
    assert report["versions"]["torch"]
    assert report["config"]["budget_s"] == BUDGET_S and report["config"]["scale"] == "quick"
    assert set(report["budget"]["sections"]) == set(run_all.SECTIONS)
    assert {r["section"] for r in report["rows"]} == set(run_all.SECTIONS)  # every section has its row(s)
    for r in report["rows"]:
        _check_row(r)


@pytest.fixture(scope="module")
def losses_rows(tmp_path_factory):
    """The losses section alone with room to finish (the full run above may have had to stop it)."""
    rows, rec = run_all.run_section("losses", 120.0, "quick", 2, tmp_path_factory.mktemp("losses"))
    return rows, rec


def test_a_section_measures_its_rows(losses_rows, tmp_path):
    rows, rec = losses_rows
    assert rec["status"] == "ok" and rec["device"]["type"] == "cpu"
    assert [r["id"] for r in rows] == ["loss.nt_xent.M64.D32.fp32", "loss.simclr.B24.fp32", "loss.mocov2.B16.K80.fp32",
                                       "loss.mocov3.B16.W4.fp32"]
    for r in rows:
        assert r["status"] == "ok", r
        _check_row(r)
        assert r["ratio"] is not None and len(r["ours"]["repeats"]) == len(r["baseline"]["repeats"]) == 2
        assert r["extra"]["kernel_backend"] == "triton-interpreter" and r["extra"]["loss_abs_diff"] < 1e-4
        assert "Triton interpreter" in r["ours"]["name"]  # a CPU row says it is not a speed


def test_rows_not_measured_carry_reasons(quick_run):
    report, *_ = quick_run
    for r in report["rows"]:
        if r["status"] != "ok":
            assert isinstance(r["reason"], str) and len(r["reason"]) > 5, r
    gpu_rows = [r for r in report["rows"] if r["id"] == "data.dali_gpu"]
    for r in gpu_rows:  # planned when the data section ran: no GPU here
        assert r["status"] == "skipped" and r["reason"] == "no GPU available"


def test_budget_is_not_overrun(quick_run):
    report, _, _, wall, _ = quick_run
    assert report["budget"]["wall_s"] <= BUDGET_S
    assert wall <= BUDGET_S + SLACK_S
    for name, rec in report["budget"]["sections"].items():
        if rec["status"] == "skipped" and rec["reason"].startswith("budget"):
            assert "s of the 30 s budget were left" in rec["reason"], rec


def _cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _check_table(block: str, report: dict) -> None:
    lines = [ln for ln in block.splitlines() if ln.startswith("| ") and not ln.startswith("| what")]
    assert len(lines) == len(report["rows"])
    assert report["date"] in block and f"budget {report['config']['budget_s']:g} s" in block
    for line, r in zip(lines, report["rows"]):
        what, baseline, ours, ratio, target = _cells(line)
        assert what == r["what"]
        if r["status"] == "ok":
            assert ours.startswith(r["ours"]["name"]) and f" {r['ours']['unit']}" in ours
            if r["baseline"]:
                assert baseline.startswith(r["baseline"]["name"])
            if r["ratio"] is None:
                assert ratio == "—"
            else:
                assert float(ratio.rstrip("×")) == pytest.approx(r["ratio"], rel=0.05, abs=0.006)
        else:
            assert r["reason"] in ours and ("not measured" in ours or "failed" in ours)
            assert ratio == "—"
        assert target == (r["target"] or "—")


def test_table_is_regenerated_from_the_json(quick_run):
    report, before, after, _, _ = quick_run
    head, rest = before.split(run_all.BEGIN)
    tail = rest.split(run_all.END)[1]
    assert after.startswith(head + run_all.BEGIN) and after.endswith(run_all.END + tail), "only the table changes"
    _check_table(after[len(head + run_all.BEGIN):-len(run_all.END + tail)], report)


def test_measured_rows_in_the_table(quick_run, losses_rows, tmp_path):
    report, before, *_ = quick_run
    report = {**report, "rows": losses_rows[0] + report["rows"]}
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(before)
    run_all.update_doc(doc, run_all.render(report, "bench/results/x.json"))
    _check_table(doc.read_text().split(run_all.BEGIN)[1].split(run_all.END)[0], report)


def test_a_budget_too_small_skips_sections_instead_of_overrunning(tmp_path):
    out, wall = _run(["--quick", "--budget-s", "6", "--sections", "train", "generate", "--out-dir", str(tmp_path),
                      "--no-doc"], tmp_path)
    (path,) = tmp_path.glob("*.json")
    report = json.loads(path.read_text())
    assert [r["id"] for r in report["rows"]] == ["train", "generate"]
    for r in report["rows"]:
        assert r["status"] == "skipped" and r["reason"].startswith("budget: this section takes about"), r
    assert report["budget"]["wall_s"] <= 6 and wall <= 6 + SLACK_S
    assert "**not measured**: budget" in out


def test_a_section_past_its_share_is_stopped(tmp_path):
    start = time.monotonic()
    rows, rec = run_all.run_section("data", 3.0, "quick", 1, tmp_path)
    assert time.monotonic() - start <= 3.0 + 1.0  # stopped within its share (+ the kill itself)
    assert rec["status"] == "stopped" and rec["allotted_s"] == 3.0
    assert rows and all(r["status"] == "skipped" for r in rows)
    assert all(r["reason"] == "budget: the section's share (3 s) ran out before this row finished" for r in rows)
