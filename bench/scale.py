"""Cost as the work grows: the dataset index at N = 10 k, 100 k and 1.28 M entries, projected to 10 M.

    python bench/scale.py                          # every size below (~20 min on 2 shared CPU cores)
    python bench/scale.py --sizes 10000,100000     # only these sizes
    python bench/scale.py --table                  # rewrite the table in docs/SCALING.md from the latest JSON

Sections (``--sections``): ``index`` (this file's): per N,

* **build**: validated files/s per core (files / CPU seconds of the building process and its pool,
  so other jobs on a shared machine do not count) and the wall time with `default_workers` processes;
* **rerun**: the next ``build_index`` with nothing changed, then with 1 % of the files rewritten
  (only those are read again);
* **load**: what every rank does, ``open_index`` in a fresh process: seconds, and the resident memory it
  adds (RSS after minus before, ``/proc/self/status``), right after opening and after touching every
  numeric column (labels, sizes, file stats: the pages a loader maps over an epoch; file-backed, so
  ranks of one node share them in the page cache); and, for comparison, parsing the schema-1
  ``index.json`` of the same entries (what every rank did before).

What is synthetic. Every image is the same 16 x 16 JPEG with a comment segment naming its class
folder; within a class folder the files are hard links to one file (`make_files`: on this VM's disk
every freed block is discarded synchronously, ~5 ms per deleted file, so 1.28 M distinct files could
not even be deleted in the budget). Validation still opens, reads, hashes and decodes every path (the
bytes come from the page cache, as they would for a dataset read twice), and discovery still lists
and stats every entry. Decoding a 16 x 16 JPEG costs almost nothing, so **build** measures the
per-file overhead (open, read, hash, PIL, bookkeeping); a second rate on 1,000 ImageNet-like
500 x 375 JPEGs gives the decode-bound rate a real dataset sees. Every size up to ``--validate-max``
(default 1.28 M) is built from files. Above it no files are made: the index is written from the
synthetic listing (made-up hashes), which is what a completed validation leaves behind, so **load**
is still measured while build and rerun are not. 10 M is projected linearly from the largest N built
from files (per-entry costs; opening maps files and does not grow with N).

Writes ``bench/results/<date>-scale-index-<device>.json`` and a plot beside it. Another section
(the view store) adds its own ``bench_<name>`` to `SECTIONS` and its own results file.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from genssl.engine.atomic import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"
DOC = Path(__file__).resolve().parent.parent / "docs" / "SCALING.md"
SIZES = (10_000, 100_000, 1_280_000)
VALIDATE_MAX = 1_280_000  # above this, the index is written from the listing (module docstring)
TARGET_LOAD_S, TARGET_RSS_MB, TARGET_N = 2.0, 100.0, 1_280_000
PROJECT_N = 10_000_000


def device_name() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu-{platform.processor() or platform.machine()}-{cores}cores"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def cpu_s() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# ---------------------------------------------------------------------------------------------
# synthetic data


def _jpeg(w: int, h: int, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = (rng.random((max(1, h // 32), max(1, w // 32), 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(coarse).resize((w, h), Image.BILINEAR).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _with_comment(jpeg: bytes, text: bytes) -> bytes:
    """The same image with a COM segment after SOI: other bytes (and hash), same pixels."""
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def layout(n: int, per_class: int = 1300) -> list[str]:
    """Relative paths of an ImageNet-like ImageFolder: ``n`` files in classes of ``per_class``."""
    return [f"n{i // per_class:08d}/img_{i:08d}.JPEG" for i in range(n)]


def make_files(root: Path, rels: list[str], base: bytes, salt: str = "") -> float:
    """Make every file; returns seconds taken. Each class folder gets one file of its own bytes (``base``
    with the folder's name as a comment) and the rest of the folder are hard links to it: a link costs
    no data block, so creating and deleting 1.28 M files takes minutes on a disk that discards freed
    blocks synchronously (this one: ~5 ms per unlinked file). ext4 allows 65,000 links per file."""
    start = time.perf_counter()
    bases = root.parent / f".bases-{root.name}"
    bases.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    for rel in rels:
        folder = rel.rpartition("/")[0]
        src = made.get(folder)
        if src is None:
            (root / folder).mkdir(parents=True, exist_ok=True)
            src = made[folder] = bases / f"{len(made)}.jpg"
            src.write_bytes(_with_comment(base, f"{salt}{folder}".encode()))
        os.link(src, root / rel)
    return time.perf_counter() - start


def remove_files(root: Path) -> float:
    start = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(root.parent / f".bases-{root.name}", ignore_errors=True)
    return time.perf_counter() - start


def rewrite(path: Path, data: bytes) -> None:
    """New bytes in a new file renamed over ``path`` (writing in place would change every link to it)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def index_from_listing(root: Path, cache: Path, rels: list[str], stat_files: bool) -> None:
    """Publish an index of ``rels`` as a completed validation would, without decoding (16 x 16, made-up
    hashes); with ``stat_files`` the real files' sizes and mtimes, so a rerun trusts them."""
    from genssl.data.index import _fingerprint, index_cache_dir
    from genssl.data.index_columns import OK, encode_rel, write_generation

    rels = sorted(rels)
    n = len(rels)
    if stat_files:
        stats = np.array([(st.st_size, st.st_mtime_ns) for st in (os.stat(root / r) for r in rels)], np.int64)
    else:
        stats = np.tile(np.array([[700, time.time_ns() - 3600 * 10**9]], np.int64), (n, 1))
    classes = sorted({r.partition("/")[0] for r in rels})
    position = {c: i for i, c in enumerate(classes)}
    labels = np.array([position[r.partition("/")[0]] for r in rels], np.int32)
    sha = np.random.default_rng(0).integers(0, 256, size=(n, 32), dtype=np.uint8)
    blob, offsets = encode_rel(rels)
    columns = {"rel": blob, "rel_offsets": offsets, "status": np.full(n, OK, np.uint8), "labels": labels,
               "sizes": np.full((n, 2), 16, np.int32), "src_stats": stats, "read_stats": stats, "sha256": sha}
    header = {"root": str(root.resolve()), "kind": "imagefolder", "base": str(root.resolve()), "shards": [],
              "classes": classes, "n": n, "n_ok": n,
              "fingerprint": _fingerprint(classes, ((r, int(y), s.tobytes().hex()) for r, y, s in zip(rels, labels, sha))),
              "pre_quarantine": [], "reasons": [], "ignored": {}, "built_ns": time.time_ns()}
    work = index_cache_dir(root, cache)
    work.mkdir(parents=True, exist_ok=True)
    write_generation(work, columns, header)
    (work / "quarantine.json").write_text(json.dumps({"root": header["root"], "count": 0, "files": []}))


def schema1_json(path: Path, root: Path, rels: list[str]) -> None:
    """The schema-1 index.json of the same entries (the format this replaces), for the load comparison."""
    entries = {r: {"size": 700, "mtime_ns": 1_700_000_000_000_000_000, "status": "ok", "w": 16, "h": 16,
                   "sha256": f"{i:064x}"} for i, r in enumerate(rels)}
    doc = {"version": 1, "root": str(root), "kind": "imagefolder", "classes": [], "built_ns": 0,
           "pre_quarantine": [], "entries": entries}
    path.write_text(json.dumps(doc))


# ---------------------------------------------------------------------------------------------
# measurements, each in a fresh process (clean RSS and CPU counters)


def child(op: str, **kw) -> dict:
    cmd = [sys.executable, "-m", "genssl.bench.scale", "--child", json.dumps({"op": op, **kw})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{op} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_child(spec: dict) -> dict:
    import logging

    logging.disable(logging.WARNING)
    from genssl.data import index as index_mod

    op = spec["op"]
    if op == "build":
        cpu0, t0 = cpu_s(), time.perf_counter()
        reads = []
        real = index_mod._read_bytes
        index_mod._read_bytes = lambda p: (reads.append(1), real(p))[1]  # this process's reads (re-hashes, small todo)
        ix = index_mod.build_index(spec["folder"], spec["cache"], num_workers=spec.get("workers"))
        return {"wall_s": time.perf_counter() - t0, "cpu_s": cpu_s() - cpu0, "n": len(ix),
                "workers": spec.get("workers") or index_mod.default_workers(), "reads_here": len(reads),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if op == "load":
        before = rss_mb()
        t0 = time.perf_counter()
        ix = index_mod.open_index(spec["folder"], spec["cache"])
        open_s = time.perf_counter() - t0
        after_open = rss_mb()
        t0 = time.perf_counter()
        n = len(ix)
        checksum = int(np.asarray(ix.labels).sum() + np.asarray(ix.sizes).sum() + np.asarray(ix.file_stats[:, 0]).sum())
        last = ix.paths[n - 1]
        touch_s = time.perf_counter() - t0
        return {"n": n, "open_s": open_s, "rss_open_mb": after_open - before, "touch_s": touch_s,
                "rss_touched_mb": rss_mb() - before, "checksum": checksum, "last_path_chars": len(last)}
    if op == "load_json":
        before = rss_mb()
        t0 = time.perf_counter()
        doc = json.loads(Path(spec["path"]).read_text())
        return {"n": len(doc["entries"]), "open_s": time.perf_counter() - t0, "rss_open_mb": rss_mb() - before}
    raise ValueError(f"unknown child op {op!r}")


# ---------------------------------------------------------------------------------------------
# section: the index


def bench_index(sizes: list[int], scratch: Path, validate_max: int = VALIDATE_MAX, save=lambda out: None) -> dict:
    out: dict = {"sizes": {}, "synthetic": "16 x 16 JPEG with a distinct comment per file; see bench/scale.py"}
    # decode-bound rate on ImageNet-like images (~500 x 375, q90), 1,000 files
    real_like = scratch / "imagenet_like"
    rels = layout(1000, per_class=100)
    make_files(real_like, rels, _jpeg(500, 375, seed=1))
    b = child("build", folder=str(real_like), cache=str(scratch / "cache-like"))
    out["imagenet_like_files_per_core_s"] = b["n"] / b["cpu_s"]
    print(f"imagenet-like 500x375: {out['imagenet_like_files_per_core_s']:.0f} files/s per core", flush=True)
    save(out)
    remove_files(real_like)
    tiny = _jpeg(16, 16)
    from genssl.data.index import RACY_NS, index_cache_dir
    from genssl.data.index_columns import current_generation

    for n in sizes:
        row: dict = {}
        folder, cache = scratch / f"n{n}", scratch / f"cache-{n}"
        rels = layout(n)
        if n <= validate_max:
            row["create_s"] = make_files(folder, rels, tiny)
            b = child("build", folder=str(folder), cache=str(cache))
            row["build"] = b | {"files_per_core_s": n / b["cpu_s"], "files_per_s": n / b["wall_s"]}
            time.sleep(RACY_NS / 1e9)  # files younger than this at the last build are re-hashed ("racily clean")
            row["rerun_unchanged"] = child("build", folder=str(folder), cache=str(cache))
            changed = rels[:: 100]  # 1 %: new bytes (and size, mtime)
            for i, rel in enumerate(changed):
                rewrite(folder / rel, _with_comment(tiny, f"changed-{i}-longer".encode()))
            row["rerun_1pct_changed"] = child("build", folder=str(folder), cache=str(cache)) | {"changed": len(changed)}
        else:  # no files: the index a completed validation of this listing would leave
            t0 = time.perf_counter()
            index_from_listing(folder, cache, rels, stat_files=False)
            row["listing_index_s"] = time.perf_counter() - t0
        row["load"] = child("load", folder=str(folder), cache=str(cache))
        js = scratch / f"schema1-{n}.json"
        schema1_json(js, folder, rels)
        row["load_schema1_json"] = child("load_json", path=str(js)) | {"bytes": js.stat().st_size}
        js.unlink()
        work = index_cache_dir(folder, cache)
        row["index_bytes"] = sum(p.stat().st_size for p in (work / current_generation(work)).iterdir())
        row["delete_s"] = remove_files(folder)
        shutil.rmtree(cache, ignore_errors=True)
        out["sizes"][str(n)] = row
        print(f"N={n}: {json.dumps(row, default=float)}", flush=True)
        save(out)  # after every size: a long run stopped later keeps what it measured
    return out


def project(out: dict) -> dict:
    """Linear per-entry costs: building and rerunning from the largest N built from files, loading
    from the largest N (opening maps files, so its time is taken as is)."""
    measured = {int(k): v for k, v in out["sizes"].items()}
    built = [k for k, v in measured.items() if "build" in v]
    if not measured or not built:
        return {}
    top, top_built = max(measured), max(built)
    b, row = measured[top_built], measured[top]
    return {"n": PROJECT_N, "from_n": top, "rerun_from_n": top_built,
            "rerun_unchanged_s": b["rerun_unchanged"]["wall_s"] * PROJECT_N / top_built,
            "rerun_peak_rss_mb": b["rerun_unchanged"]["peak_rss_mb"] * PROJECT_N / top_built,
            "load_open_s": row["load"]["open_s"], "load_rss_open_mb": row["load"]["rss_open_mb"],
            "load_rss_touched_mb": row["load"]["rss_touched_mb"] * PROJECT_N / top,
            "index_bytes": row["index_bytes"] * PROJECT_N / top,
            "tiny_build_core_hours": PROJECT_N / b["build"]["files_per_core_s"] / 3600,
            "imagenet_like_build_core_hours": PROJECT_N / out["imagenet_like_files_per_core_s"] / 3600}


SECTIONS = {"index": bench_index}  # name -> fn(sizes, scratch folder, validate_max, save(results)) -> results


# ---------------------------------------------------------------------------------------------
# table and plot


def latest(section: str) -> Path:
    files = sorted(RESULTS.glob(f"*-scale-{section}-*.json"))
    if not files:
        raise SystemExit(f"no bench/results/*-scale-{section}-*.json yet; run python bench/scale.py first")
    return files[-1]


def index_table(res: dict) -> str:
    r = res["sections"]["index"]
    lines = [f"Device: {res['device']} (shared with other jobs; load average {res['loadavg']:.0f}), "
             f"{res['date']}, `{latest('index').name}`.", "",
             "| N | build: files/s per core | build wall (s) | rerun, unchanged (s) | rerun, 1 % changed (s) | "
             "rerun peak RSS rank 0 (MB) | load (s) | load RSS (MB) | RSS after touching all columns (MB) | "
             "schema-1 JSON load (s / MB) | index on disk (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, row in sorted(r["sizes"].items(), key=lambda kv: int(kv[0])):
        b = row.get("build")
        build = (f"{b['files_per_core_s']:.0f}", f"{b['wall_s']:.1f}") if b else ("— (listing)", "—")
        rerun = ((f"{row['rerun_unchanged']['wall_s']:.1f}", f"{row['rerun_1pct_changed']['wall_s']:.1f}",
                  f"{row['rerun_unchanged']['peak_rss_mb']:.0f}") if b else ("—", "—", "—"))
        js = row["load_schema1_json"]
        lines.append(f"| {int(n):,} | {build[0]} | {build[1]} | {rerun[0]} | {rerun[1]} | {rerun[2]} | "
                     f"{row['load']['open_s']:.3f} | {row['load']['rss_open_mb']:.1f} | "
                     f"{row['load']['rss_touched_mb']:.1f} | {js['open_s']:.2f} / {js['rss_open_mb']:.0f} | "
                     f"{row['index_bytes'] / 2**20:.0f} |")
    p = r.get("projection", {})
    if p:
        lines.append(f"| {p['n']:,} (projected) | — | "
                     f"{p.get('tiny_build_core_hours', float('nan')):.1f} core-h tiny, "
                     f"{p.get('imagenet_like_build_core_hours', float('nan')):.0f} core-h ImageNet-like | "
                     f"{p['rerun_unchanged_s']:.0f} | — | {p['rerun_peak_rss_mb']:.0f} | {p['load_open_s']:.3f} | "
                     f"{p['load_rss_open_mb']:.1f} | {p['load_rss_touched_mb']:.0f} | — | {p['index_bytes'] / 2**20:.0f} |")
    at = r["sizes"].get(str(TARGET_N))
    if at:
        ok_t, ok_m = at["load"]["open_s"] <= TARGET_LOAD_S, at["load"]["rss_touched_mb"] <= TARGET_RSS_MB
        lines += ["", f"Targets at {TARGET_N:,} entries: load ≤ {TARGET_LOAD_S:g} s — "
                      f"{'met' if ok_t else 'missed'} ({at['load']['open_s']:.3f} s); ≤ {TARGET_RSS_MB:g} MB extra "
                      f"resident per rank — {'met' if ok_m else 'missed'} ({at['load']['rss_open_mb']:.1f} MB on "
                      f"opening, {at['load']['rss_touched_mb']:.1f} MB after touching every numeric column)."]
    lines += ["", f"Validation of ImageNet-like 500 x 375 JPEGs: {r['imagenet_like_files_per_core_s']:.0f} files/s per core."]
    return "\n".join(lines)


def write_table() -> None:
    res = json.loads(latest("index").read_text())
    text = DOC.read_text()
    start, end = "<!-- index-table -->", "<!-- /index-table -->"
    if start not in text or end not in text:
        raise SystemExit(f"{DOC} lacks the {start} ... {end} markers")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    from genssl.engine.atomic import write_text_atomic

    write_text_atomic(DOC, f"{head}{start}\n{index_table(res)}\n{end}{tail}")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = res["sections"]["index"]["sizes"]
    ns = sorted(int(k) for k in r)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    built = [n for n in ns if "build" in r[str(n)]]
    a.loglog(built, [r[str(n)]["build"]["wall_s"] for n in built], "o-", label="first build, 2 processes (rank 0)")
    a.loglog(built, [r[str(n)]["rerun_unchanged"]["wall_s"] for n in built], "o-", label="rerun, unchanged (rank 0)")
    a.loglog(ns, [r[str(n)]["load"]["open_s"] for n in ns], "o-", label="load (every rank)")
    a.loglog(ns, [r[str(n)]["load_schema1_json"]["open_s"] for n in ns], "x--", label="schema-1 JSON parse (before)")
    a.axhline(TARGET_LOAD_S, color="grey", lw=0.8, ls=":", label="load target")
    a.set_xlabel("entries N"), a.set_ylabel("seconds"), a.legend(fontsize=8)
    b.loglog(ns, [max(0.1, r[str(n)]["load"]["rss_touched_mb"]) for n in ns], "o-", label="load, all columns touched")
    b.loglog(ns, [max(0.1, r[str(n)]["load_schema1_json"]["rss_open_mb"]) for n in ns], "x--", label="schema-1 JSON")
    b.axhline(TARGET_RSS_MB, color="grey", lw=0.8, ls=":", label="target")
    b.set_xlabel("entries N"), b.set_ylabel("extra resident MB per rank"), b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--sections", default="index")
    parser.add_argument("--scratch", default="/tmp/scale")
    parser.add_argument("--validate-max", type=int, default=VALIDATE_MAX,
                        help="largest N whose files are validated; larger N get an index from the listing")
    parser.add_argument("--table", action="store_true", help="only rewrite docs/SCALING.md from the latest results")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_run_child(json.loads(args.child))))
        return
    if args.table:
        write_table()
        return
    scratch = Path(args.scratch)
    free = shutil.disk_usage(scratch.parent if not scratch.exists() else scratch).free
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if free < max(sizes) * 1024:  # directory entries, the index (~120 B per entry) and headroom
        raise SystemExit(f"{scratch}: {free / 2**30:.1f} GiB free, too little for {max(sizes):,} files; pass --sizes")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    stamp = datetime.date.today().isoformat()
    try:
        for name in args.sections.split(","):
            path = RESULTS / f"{stamp}-scale-{name}-{device_name()}.json"
            SECTIONS[name](sizes, scratch, args.validate_max, lambda out: save(path, name, out))
            print(f"wrote {path}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def save(path: Path, name: str, out: dict) -> None:
    """Merge this run's sizes into today's results (sizes measured in separate runs add up) and write them."""
    old = json.loads(path.read_text())["sections"][name] if path.exists() else {"sizes": {}}
    merged = old | out | {"sizes": old["sizes"] | out["sizes"]}
    if name == "index":
        merged["projection"] = project(merged)
    res = {"date": path.name[:10], "device": device_name(), "loadavg": os.getloadavg()[0],
           "python": platform.python_version(), "sections": {name: merged}}
    write_json_atomic(path, res)
    if name == "index" and merged["sizes"]:
        plot(res, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
