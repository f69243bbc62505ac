"""Does genssl's training make encoders better? Random init vs DINO vs Gen-DINO on real photos.

    python bench/learning.py                                   # ../shared/data/cifar10, preset=cpu, every row
    python bench/learning.py --rows dino                       # random init + DINO only
    python bench/learning.py --data /my/imagefolder --out runs/learning epochs=20

One row per trained encoder, each with k-NN top-1/top-5 and linear-probe top-1 on the val split,
beside the floor every pretraining must beat: the randomly initialised encoder of the same
architecture and seed. All rows train for the same number of epochs with the same settings.

Rows (``--rows``, comma-separated; default: dino,gendino,pgen,k4):
  dino      stage 1 of recipes/dino_gensis.py (plain DINO) — and the random-init row
  gendino   Gen-DINO with the recipe's defaults (E-LDM, view store and Gen-DINO trained here)
  pgen      Gen-DINO with the other p_gen (1.0 vs 0.5: the paper's "real + synthetic as an input pair")
  k4        Gen-DINO with K = 4 synthetic views per image instead of 1 (a fresh view each epoch)
  simclr, mocov2, mocov3, byol, simsiam, barlow, swav
            the base method of recipes/ssl_methods.py with its ``preset=cpu`` (same backbone, seed and epochs)
Each Gen-DINO variant reuses the stage-1 encoder and the E-LDM of the ``gendino`` row (same data,
same seed): only what differs is rerun. Every stage resumes, so rerunning the command finishes
an interrupted benchmark; a finished pipeline copied to ``--out``/base (say the main job's
``runs/gensis``, with the same preset and data) is reused. Wall times are each stage's own
(training + evaluation, from its stage.json).

Writes ``bench/results/<date>-learning-<data>-<device>.json`` (device, versions, command, config,
rows with wall times) and rewrites the data set's table in docs/LEARNING.md between its markers:
the latest measurement of every row found in the results of that data set and device, each row
naming its JSON, so a run of some rows keeps the others' earlier numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"
GENSIS_ROWS = ("dino", "gendino", "pgen", "k4")
SSL_ROWS = ("simclr", "mocov2", "mocov3", "byol", "simsiam", "barlow", "swav")
ROWS = GENSIS_ROWS + SSL_ROWS
TABLES_ANCHOR = "<!-- learning-tables -->"  # docs/LEARNING.md: one table per data set follows it


def run_pipeline(out: Path, keys: list[str], log: Path, recipe: str = "dino_gensis.py") -> dict:
    """One recipe run in its own process (as a user runs it); its eval.json.

    Finished stages and runs skip or resume, so only what is missing runs."""
    cmd = [sys.executable, str(REPO / "recipes" / recipe), f"out={out}", "log.progress=false", *keys]
    print("$", " ".join(cmd), flush=True)
    with open(log, "a") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"bench/learning.py: the run failed (exit {proc.returncode}); its output is in {log}")
    return json.loads((out / "eval.json").read_text())


def row(name: str, result: dict | None, wall_s: float | None, note: str = "") -> dict:
    result = result or {}
    return {"row": name, "knn_top1": result.get("knn_top1"), "knn_top5": result.get("knn_top5"),
            "linear_top1": result.get("linear_top1"), "wall_s": wall_s, "note": note}


def stage_wall_s(run: Path) -> float | None:
    """Wall time of one finished stage (training + evaluation), as its stage.json records it."""
    marker = run / "stage.json"
    return json.loads(marker.read_text()).get("wall_s") if marker.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="ImageFolder with train/ and val/ class folders")
    parser.add_argument("--out", default=str(REPO / "runs" / "learning"))
    parser.add_argument("--rows", default=",".join(GENSIS_ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--preset", default="cpu", help="recipe preset (cpu: 32 px photos, 2 CPU cores)")
    parser.add_argument("--no-write", action="store_true", help="print only: no results JSON, no docs table")
    parser.add_argument("keys", nargs="*", help="extra key=value settings for every run (e.g. epochs=20)")
    args = parser.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"bench/learning.py: unknown row(s) {unknown}; choose from {', '.join(ROWS)}")
    builtin = args.data.startswith("builtin:")
    data = args.data if builtin else Path(args.data).resolve()
    if not builtin and not ((data / "train").is_dir() and (data / "val").is_dir()):
        raise SystemExit(f"bench/learning.py: {data} is not an ImageFolder with train/ and val/; pass --data "
                         "/path/to/images (class subfolders under train/ and val/) or a builtin:shapes?… spec")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench.log"
    common = [f"preset={args.preset}", f"data={data}", *args.keys]

    table: list[dict] = []
    base = out / "base"
    # DINO alone first (its row is final even if a later stage fails); the Gen-SIS stages then skip it.
    # A finished pipeline already in --out/base (e.g. the main job's folder, copied) is reused as is.
    results = run_pipeline(base, [*common, "gen=off"], log)
    table.append(row("random init", results.get("random_init"), None, "same architecture and seed, untrained"))
    table.append(row("DINO", results["dino"], stage_wall_s(base / "dino"), "stage 1 of the pipeline"))
    reuse = [f"encoder={base / 'dino'}", f"eldm={base / 'eldm'}"]
    if any(r in GENSIS_ROWS[1:] for r in rows):
        results = run_pipeline(base, common, log)
        setting = f"p_gen={results['config']['gendino']['p_gen']}, K={results['config']['generation']['views_per_image']}"
        table.append(row("Gen-DINO", results["gen_dino"], stage_wall_s(base / "gen_dino"), setting))
    if "pgen" in rows:
        other = 0.5 if results["config"]["gendino"]["p_gen"] == 1.0 else 1.0
        variant = out / f"pgen{other}"
        res = run_pipeline(variant, [*common, *reuse, f"views={base / 'views.zarr'}", f"gendino.p_gen={other}"], log)
        table.append(row("Gen-DINO", res["gen_dino"], stage_wall_s(variant / "gen_dino"),
                         f"p_gen={other}, K={res['config']['generation']['views_per_image']}"))
    if "k4" in rows:
        variant = out / "k4"
        res = run_pipeline(variant, [*common, *reuse, "generation.views_per_image=4"], log)
        table.append(row("Gen-DINO", res["gen_dino"], stage_wall_s(variant / "gen_dino"),
                         f"p_gen={res['config']['gendino']['p_gen']}, K=4"))

    from genssl.recipes import ssl_methods  # display names only; the runs are subprocesses

    for method in (r for r in rows if r in SSL_ROWS):
        variant = out / method
        started = time.perf_counter()
        res = run_pipeline(variant, [*common, f"method={method}"], log, recipe="ssl_methods.py")
        table.append(row(ssl_methods.NAMES[method], res, time.perf_counter() - started,
                         "recipes/ssl_methods.py (wall time of this invocation: 0 + evaluation if it had finished before)"))

    epochs = results["config"]["epochs"]
    data_name = args.data if builtin else data.name
    print(format_table(table, epochs, data_name))
    if not args.no_write:
        write_results(table, results["config"], epochs, data_name)


def format_table(table: list[dict], epochs: int, data_name: str) -> str:
    def pct(v):
        return f"{v:.2f}" if v is not None else "—"

    with_source = any("source" in r for r in table)
    lines = [f"| encoder ({epochs} epochs, {data_name}) | k-NN top-1 % | k-NN top-5 % | linear top-1 % | wall time (train + eval) | settings |"
             + (" measured in |" if with_source else ""), "|---|---|---|---|---|---|" + ("---|" if with_source else "")]
    for r in table:
        wall = f"{r['wall_s'] / 60:.1f} min" if r["wall_s"] else "—"
        source = f" `{r['source']}` |" if with_source else ""
        lines.append(f"| {r['row']} | {pct(r['knn_top1'])} | {pct(r['knn_top5'])} | {pct(r['linear_top1'])} | {wall} | {r['note']} |{source}")
    return "\n".join(lines)


def latest_rows(pattern: str, epochs: int) -> list[dict]:
    """The latest measurement of every (row, settings) at ``epochs`` in the results files matching
    ``pattern`` (a later file's row replaces an earlier one), each with its ``source`` file."""
    rows: dict[tuple[str, str], dict] = {}
    for path in sorted((REPO / "bench" / "results").glob(pattern), key=lambda p: (p.name[:10], p.stat().st_mtime)):
        doc = json.loads(path.read_text())
        if doc.get("epochs") != epochs:
            continue
        for r in doc["rows"]:
            rows[(r["row"], r["note"])] = {**r, "source": str(path.relative_to(REPO))}
    return list(rows.values())


def device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def write_results(table: list[dict], config: dict, epochs: int, data_name: str) -> None:
    """The JSON under bench/results/ and this data set's table in docs/LEARNING.md (its own markers)."""
    import deepspeed
    import torch

    stamp = datetime.date.today().isoformat()
    name = device()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", data_name).strip("-").lower()
    doc = {"bench": "learning", "date": stamp, "device": name, "command": " ".join(sys.argv),
           "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": platform.python_version()},
           "data": data_name, "epochs": epochs, "rows": table, "config": config}
    results = REPO / "bench" / "results" / f"{stamp}-learning-{slug}-{name}.json"
    results = results.with_name(f"{results.stem}-{int(time.time())}.json") if results.exists() else results
    results.write_text(json.dumps(doc, indent=2) + "\n")
    merged = latest_rows(f"*-learning-{slug}-{name}*.json", epochs)
    docs = REPO / "docs" / "LEARNING.md"
    text = docs.read_text()
    begin, end = f"<!-- learning-table:{slug}:begin -->", f"<!-- learning-table:{slug}:end -->"
    body = (f"{begin}\nLatest measurement of each row on {name}, every row at the same epochs and settings"
            " (docs/LEARNING.md explains the `cpu` preset):\n\n"
            f"{format_table(merged, epochs, data_name)}\n{end}")
    if begin in text:
        text = text[:text.index(begin)] + body + text[text.index(end) + len(end):]
    else:
        anchor = text.index(TABLES_ANCHOR) + len(TABLES_ANCHOR)
        text = text[:anchor] + "\n\n" + body + text[anchor:]
    docs.write_text(text)
    print(f"wrote {results} and the {data_name} table in {docs}")


if __name__ == "__main__":
    main()
