"""The view store at scale: write and read throughput (views/s), bytes per view and number of files for
N sources of 32² and 256² views, schema 2 (JPEG q95 in Zarr shards, `genssl.data.viewstore`) against
the schema-1 layout it replaced (raw uint8, one chunk file per source per array).

    python -m genssl.bench.scale_views                          # N = 10k, 100k; 32², 256²
    python -m genssl.bench.scale_views --sizes 2000 --sides 32  # a quick run
    python -m genssl.bench.scale_views --no-store               # only the Gen-SIS loader's host cost

The views are SYNTHETIC: smooth noise (a sum of bicubically upsampled Gaussian noise octaves, the
amplitude ×0.55 per octave, rescaled to 0..255) cut at per-source offsets from a bank of 64 larger
images, so every source differs. Natural-looking in spectrum, not photographs: real photographs hold
more fine detail, so their JPEGs are larger and the byte ratio smaller (measure on your own views with
`measure_store`). One view per source (K = 1, J = 0), written with fsync (``durable=True``) in groups
of 16 sources through ``write_sources`` (one commit per group, as a generation job with batch_size 16
writes), and at N = 2k also one source at a time through ``write_source`` (one commit per source,
what generators/job.py does today); reads go in a random order over up to
``read_sample`` sources: ``encoded_views`` (shard read + crc32c: what the training loader feeds DALI)
and ``views`` (decoded on the host with Pillow). The raw layout is written with plain Zarr exactly as
schema 1 stored it, one source at a time (at N ≤ ``--raw-max-sources``: its rate does not depend on N,
and 100k sources of it take half an hour here).
Writes ``bench/results/<date>-scale-views-cpu.json`` (atomically) and prints a table. Then the Gen-SIS
loader's host cost per sample at N = 10k and 100k (`measure_loader`), into ``<date>-scale-loader-cpu.json``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from genssl.data.viewstore import create_view_store, open_view_store

__all__ = ["natural_image", "ViewBank", "measure_store", "measure_raw", "measure_loader", "run", "main"]


def natural_image(rng: np.random.Generator, side: int) -> np.ndarray:
    """``uint8 [side, side, 3]`` smooth noise with a roughly 1/f spectrum (see the module docstring)."""
    from PIL import Image

    img = np.zeros((side, side, 3), np.float32)
    amp = 1.0
    for cells in (2, 4, 8, 16, 32, 64):
        if cells > side:
            break
        c = rng.standard_normal((cells, cells, 3)).astype(np.float32)
        img += amp * np.stack([np.asarray(Image.fromarray(c[..., ch], mode="F").resize((side, side), Image.BICUBIC))
                               for ch in range(3)], -1)
        amp *= 0.55
    img = (img - img.min()) / (img.max() - img.min() + 1e-6) * 255
    return img.astype(np.uint8)


class ViewBank:
    """Distinct views for any number of sources, cheaply: source i is a ``side``² window of one of 64
    bank images of side 2·side, at an offset that depends on i."""

    def __init__(self, side: int, seed: int = 0, n_bank: int = 64) -> None:
        rng = np.random.default_rng(seed)
        self.side, self.bank = side, [natural_image(rng, 2 * side) for _ in range(n_bank)]

    def __call__(self, i: int) -> np.ndarray:
        img = self.bank[i % len(self.bank)]
        k = i // len(self.bank)
        y, x = (k * 7) % self.side, (k * 13 + k // self.side) % self.side
        return np.ascontiguousarray(img[y:y + self.side, x:x + self.side])


def _files_and_bytes(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != "zarr.json"]
    return len(files), sum(p.stat().st_size for p in files)


def _read_order(n: int, read_sample: int) -> np.ndarray:
    return np.random.default_rng(1).permutation(n)[:min(n, read_sample)]


def measure_store(root: Path, n: int, side: int, bank: ViewBank, *, view_format: str = "jpeg", quality: int = 95,
                  shard_size: int = 1024, group: int = 16, read_sample: int = 3000) -> dict:
    """Schema 2: write ``n`` sources (one view each, ``group`` per commit), then read a random sample back."""
    path = root / f"v2-{view_format}-{n}-{side}-{group}.zarr"
    st = create_view_store(path, n, 1, 0, side, side, {"fingerprint": "bench", "generator_hash": "bench"},
                           shard_size=shard_size, view_format=view_format, view_quality=quality)
    t0 = time.perf_counter()
    for g0 in range(0, n, group):
        idx = range(g0, min(g0 + group, n))
        if group == 1:
            st.write_source(g0, bank(g0)[None], [0])
        else:
            st.write_sources(idx, np.stack([bank(i)[None] for i in idx]), np.zeros((len(idx), 1)))
    write_s = time.perf_counter() - t0
    files, nbytes = _files_and_bytes(path / "views")
    all_files, _ = _files_and_bytes(path)
    reader = open_view_store(path)
    order = _read_order(n, read_sample)
    t0 = time.perf_counter()
    for i in order:
        reader.encoded_views(int(i))
    enc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in order:
        reader.views(int(i))
    dec_s = time.perf_counter() - t0
    err = float(np.mean([np.abs(reader.views(int(i))[0].astype(np.int16) - bank(int(i))).mean() for i in order[:50]]))
    shutil.rmtree(path)
    how = "write_source, a commit per source" if group == 1 else f"write_sources, a commit per {group} sources"
    return {"layout": f"schema 2 ({view_format}{f' q{quality}' if view_format == 'jpeg' else ''}, shards of {shard_size}; {how})",
            "n_sources": n, "side": side, "write_views_per_s": n / write_s,
            "read_encoded_views_per_s": len(order) / enc_s, "read_decoded_views_per_s": len(order) / dec_s,
            "bytes_per_view": nbytes / n, "raw_bytes_per_view": side * side * 3, "ratio_vs_raw": side * side * 3 * n / nbytes,
            "files_views_array": files, "files_per_1000_sources_per_array": 1000 * files / n, "files_total": all_files,
            "mean_abs_pixel_error": err, "write_seconds": write_s}


def measure_raw(root: Path, n: int, side: int, bank: ViewBank, *, shard_size: int = 64, read_sample: int = 3000) -> dict:
    """Schema 1 as it was written: raw uint8 chunks of one source, fsynced, then its done flag."""
    import zarr
    import zarr.codecs as zc
    from zarr.storage import LocalStore

    from genssl.data.viewstore import _fsync_dir, _fsync_file

    path = root / f"v1-raw-{n}-{side}.zarr"
    g = zarr.open_group(store=LocalStore(path), mode="w", zarr_format=3)
    common = dict(serializer=zc.BytesCodec(), compressors=[zc.Crc32cCodec()], config={"write_empty_chunks": True},
                  chunk_key_encoding={"name": "default", "separator": "."})
    views = g.create_array("views", shape=(n, 1, side, side, 3), chunks=(1, 1, side, side, 3), dtype="uint8",
                           fill_value=0, **common)
    levels = g.create_array("noise_level", shape=(n, 1), chunks=(shard_size, 1), dtype="int16", fill_value=0, **common)
    done = g.create_array("done", shape=(n,), chunks=(shard_size,), dtype="bool", fill_value=False, **common)
    t0 = time.perf_counter()
    for i in range(n):
        views[i] = bank(i)[None]
        levels[i] = [0]
        for name, key in (("views", f"c.{i}.0.0.0.0"), ("noise_level", f"c.{i // shard_size}.0")):
            _fsync_file(path / name / key)
            _fsync_dir(path / name)
        done[i] = True
    write_s = time.perf_counter() - t0
    files, nbytes = _files_and_bytes(path / "views")
    order = _read_order(n, read_sample)
    t0 = time.perf_counter()
    for i in order:
        views[int(i)]
    read_s = time.perf_counter() - t0
    shutil.rmtree(path)
    return {"layout": "schema 1 (raw uint8, a chunk file per source)", "n_sources": n, "side": side,
            "write_views_per_s": n / write_s, "read_decoded_views_per_s": len(order) / read_s,
            "bytes_per_view": nbytes / n, "raw_bytes_per_view": side * side * 3, "ratio_vs_raw": side * side * 3 * n / nbytes,
            "files_views_array": files, "files_per_1000_sources_per_array": 1000 * files / n, "write_seconds": write_s}


def measure_loader(root: Path, n: int, side: int, bank: ViewBank, *, batch_size: int = 32, steps: int = 40,
                   read_threads: int = 4) -> dict:
    """The Gen-SIS loader's host cost per sample at N sources: `_GenSISFeed.batch` (file reads with their
    checks, synthetic and interpolated view reads with crc32c, partner reads, crop parameters: all that
    runs in Python before DALI decodes) for ``steps`` batches spread over the epoch, p_gen = 0.5,
    K = J = 1. The real images are tiny JPEG hard links (bench/scale.py `make_files`), so file reads cost
    what a page-cache hit costs; the views are ``side``² JPEG q95 in a schema-2 store."""
    from genssl.bench.scale import _jpeg, layout, make_files
    from genssl.data.augment import MultiCropSpec
    from genssl.data.gensis_loader import GenSISLoader
    from genssl.data.index import build_index

    images = root / f"images-{n}"
    make_files(images, layout(n), _jpeg(16, 16))
    index = build_index(images, cache_dir=root / "cache")
    path = root / f"v2-loader-{n}-{side}.zarr"
    st = create_view_store(path, n, 1, 1, side, side, {"fingerprint": index.fingerprint, "generator_hash": "bench"})
    for g0 in range(0, n, 64):
        idx = list(range(g0, min(g0 + 64, n)))
        views = np.stack([bank(i)[None] for i in idx])
        st.write_sources(idx, views, np.zeros((len(idx), 1)), interp=views[:, :, ::-1], partners=[[(i + 1) % n] for i in idx],
                         alphas=np.full((len(idx), 1), 0.5), durable=False)
    spec = MultiCropSpec(global_size=32, local_size=16, n_local=2)
    loader = GenSISLoader(index, path, spec, batch_size, 0, 1, seed=0, p_gen=0.5, interpolation=True, read_threads=read_threads)
    order = loader.batches()
    picks = np.linspace(0, len(order) - 1, steps).astype(int)
    loader._feed.batch(order, 0, int(picks[0]))  # opens the store and the thread pool
    t0 = time.perf_counter()
    for step in picks:
        loader._feed.batch(order, 0, int(step))
    host_s = time.perf_counter() - t0
    shutil.rmtree(path)
    shutil.rmtree(images, ignore_errors=True)
    shutil.rmtree(root / f".bases-{images.name}", ignore_errors=True)
    return {"layout": f"Gen-SIS loader host feed (p_gen 0.5, K = J = 1, {read_threads} read threads)", "n_sources": n,
            "side": side, "host_us_per_sample": 1e6 * host_s / (steps * batch_size),
            "host_samples_per_s": steps * batch_size / host_s, "steps_timed": steps, "batch_size": batch_size}


def run(sizes=(10_000, 100_000), sides=(32, 256), *, root: Path | None = None, raw_max_sources: int = 10_000,
        per_source_n: int = 2_000, max_pixels: float = float("inf"), read_sample: int = 3000, log=print,
        on_row=None) -> list[dict]:
    """Every (N, side) with N·side² ≤ ``max_pixels``: schema 2 JPEG q95 in groups of 16, and schema 1
    raw where N ≤ ``raw_max_sources``; per side, one source per commit at N = ``per_source_n``."""
    rows = []

    def add(row):
        log(_fmt(row))
        rows.append(row)
        if on_row is not None:
            on_row(rows)

    with tempfile.TemporaryDirectory(dir=root) as tmp:
        for side in sides:
            bank = ViewBank(side)
            if per_source_n:
                add(measure_store(Path(tmp), per_source_n, side, bank, group=1, read_sample=read_sample))
            for n in sizes:
                if n * side * side > max_pixels:
                    log(f"N={n} at {side}²: skipped (N·side² > --max-pixels)")
                    continue
                add(measure_store(Path(tmp), n, side, bank, read_sample=read_sample))
                if n <= raw_max_sources:
                    add(measure_raw(Path(tmp), n, side, bank, read_sample=read_sample))
    return rows


def _fmt(r: dict) -> str:
    return (f"{r['layout']:<80} N={r['n_sources']:>7} {r['side']:>3}²: write {r['write_views_per_s']:8.0f} views/s, "
            f"read {r.get('read_encoded_views_per_s', float('nan')):8.0f} encoded / {r['read_decoded_views_per_s']:7.0f} "
            f"decoded views/s, {r['bytes_per_view']:8.0f} B/view ({r['ratio_vs_raw']:.1f}x smaller than raw), "
            f"{r['files_per_1000_sources_per_array']:.2f} files/1000 sources/array")


def main(argv: list[str] | None = None) -> None:
    from genssl.engine.atomic import write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--sides", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--raw-max-sources", type=int, default=10_000)
    ap.add_argument("--per-source-n", type=int, default=2_000)
    ap.add_argument("--max-pixels", type=float, default=float("inf"), help="skip (N, side) with N·side² above this")
    ap.add_argument("--read-sample", type=int, default=3000)
    ap.add_argument("--tmp", type=Path, default=None, help="where the stores are written (default: the system temp)")
    ap.add_argument("--loader-sizes", type=int, nargs="*", default=[10_000, 100_000],
                    help="N for the Gen-SIS loader's host cost (`measure_loader`, 32² views); none: skip it")
    ap.add_argument("--no-store", action="store_true", help="only the loader's host cost")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    report = {"date": datetime.date.today().isoformat(), "device": "cpu", "cpus": os.cpu_count(),
              "machine": platform.machine(), "python": platform.python_version(),
              "load_average_at_start": os.getloadavg(),
              "synthetic": "smooth-noise views (module docstring of bench/scale_views.py), one view per source",
              "complete": False, "results": []}
    out = args.out_dir / f"{report['date']}-scale-views-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(rows):  # after every row: a long run that is stopped keeps what it measured
        write_json_atomic(out, {**report, "results": rows, "load_average_now": os.getloadavg()})

    if not args.no_store:
        rows = run(args.sizes, args.sides, root=args.tmp, raw_max_sources=args.raw_max_sources,
                   per_source_n=args.per_source_n, max_pixels=args.max_pixels, read_sample=args.read_sample, on_row=save)
        write_json_atomic(out, {**report, "complete": True, "results": rows, "load_average_now": os.getloadavg()})
        print(f"wrote {out}", flush=True)
    if args.loader_sizes:
        loader_out = out.with_name(f"{report['date']}-scale-loader-cpu.json")
        rows = []
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            bank = ViewBank(32)
            for n in args.loader_sizes:
                rows.append(measure_loader(Path(tmp), n, 32, bank))
                print(f"{rows[-1]['layout']} N={n:>7}: {rows[-1]['host_us_per_sample']:.0f} µs per sample on the host",
                      flush=True)
                write_json_atomic(loader_out, {**report, "synthetic": "tiny JPEG hard links as images, smooth-noise "
                                               "32² views", "results": rows, "load_average_now": os.getloadavg()})
        print(f"wrote {loader_out}", flush=True)


if __name__ == "__main__":
    main()
