"""Convert a view store of schema 1 (raw uint8 views, one chunk file per source) to the current schema
(encoded images in Zarr shards: `genssl.data.viewstore`, docs/DATA.md "View store").

    python -m genssl.data.convert_views OLD NEW [--format jpeg|png|webp] [--quality 95] [--shard-size S]
    python -m genssl.data.convert_views OLD OLD      # in place; the old store is kept as OLD.schema1

Every chunk of the old store is checked as it is read (its crc32c through Zarr's codec, and that the
chunk file of every done source exists: Zarr would read a deleted one as zeros). A source whose data is
damaged is written as not done and listed, so the generation job (``verify=true``) regenerates it. The
new store is built in a temporary sibling folder, verified shard by shard (`ViewStore.verify_shard`),
fsynced, and only then renamed to NEW: an interrupted conversion leaves OLD as it was and no NEW.
Attributes (dataset fingerprint, generator hash, sampler settings, the caller's keys) are carried
over; the shard size stays the old one unless ``--shard-size`` says otherwise (a generation rerun
must then pass the same ``shard_size``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np

from genssl.data.viewstore import (SCHEMA_VERSION, VIEW_FORMATS, ViewStoreError, _fsync_dir, _fsync_tree, _quiet,
                                   create_view_store, encode_view)

__all__ = ["convert_view_store", "main"]

_ARRAYS = ("views", "interp", "interp_partner", "interp_alpha", "noise_level", "done")


def _open_old(path: Path):
    import zarr
    from zarr.storage import LocalStore

    if not (path / "zarr.json").is_file():
        raise ValueError(f"no view store at {path} (no zarr.json)")
    with _quiet():
        g = zarr.open_group(store=LocalStore(path, read_only=True), mode="r", zarr_format=3)
    attrs = dict(g.attrs)
    sv = attrs.get("schema_version")
    if sv == SCHEMA_VERSION:
        raise ValueError(f"{path} is already a view store of schema {SCHEMA_VERSION}: nothing to convert")
    if sv != 1 or "layout" not in attrs:
        raise ValueError(f"{path} is not a genssl view store of schema 1 (schema_version={sv!r})")
    return {name: g[name] for name in _ARRAYS}, attrs


def _chunk_exists(path: Path, a, name: str, i: int) -> bool:
    key = a.metadata.chunk_key_encoding.encode_chunk_key((i // a.chunks[0],) + (0,) * (a.ndim - 1))
    return (path / name / key).exists()


def _read_block(path: Path, arrays: dict, r: range, K: int, J: int) -> tuple[dict, dict[int, str]]:
    """Sources ``r`` of the old store: ``{array: values}`` and ``{source: why}`` for damaged done ones."""
    damaged: dict[int, str] = {}
    try:
        done = np.asarray(arrays["done"][r.start:r.stop], dtype=bool)
    except Exception as e:  # a damaged done chunk: its flags cannot be trusted
        done = np.zeros(len(r), bool)
        for i in r:
            try:
                done[i - r.start] = bool(arrays["done"][i])
            except Exception:
                damaged[i] = f"'done' chunk damaged ({e})"
    used = (["views", "noise_level"] if K else []) + (["interp", "interp_partner", "interp_alpha"] if J else [])
    out = {"done": done}
    for name in used:
        a = arrays[name]
        try:
            out[name] = np.asarray(a[r.start:r.stop])  # one read; crc32c checked by Zarr's codec
        except Exception:  # find the damaged sources one by one
            out[name] = np.zeros((len(r),) + a.shape[1:], a.dtype)
            for i in r:
                try:
                    out[name][i - r.start] = a[i]
                except Exception as e:
                    if done[i - r.start]:
                        damaged.setdefault(i, f"{name!r}: {str(e).rstrip('.')}")
        for i in r:
            if done[i - r.start] and i not in damaged and not _chunk_exists(path, a, name, i):
                damaged[i] = f"{name!r}: chunk file missing, though the source is marked done"
    return out, damaged


def _store_stats(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def convert_view_store(old: str | os.PathLike, new: str | os.PathLike, *, view_format: str = "jpeg",
                       view_quality: int = 95, shard_size: int | None = None, log=print) -> dict:
    """Rewrite the schema-1 store ``old`` as a current one at ``new`` (``new == old``: in place, the old
    store kept as ``<old>.schema1``). Returns ``{"path", "sources", "converted", "damaged": {source:
    why}, "files_before", "files_after", "bytes_before", "bytes_after"}``."""
    old, new = Path(old), Path(new)
    in_place = new.resolve() == old.resolve()
    arrays, attrs = _open_old(old)
    backup = old.with_name(old.name + ".schema1")
    if in_place and backup.exists():
        raise ValueError(f"{backup} exists (an earlier in-place conversion?); move it away first")
    if not in_place and new.exists():
        raise ValueError(f"{new} exists; choose a new path (or pass OLD twice to convert in place)")
    if view_format not in VIEW_FORMATS:
        raise ValueError(f"--format must be one of {VIEW_FORMATS}, got {view_format!r}")
    lay = attrs["layout"]
    N, K, J, H, W = (lay[k] for k in ("n_sources", "views_per_image", "interp_per_image", "height", "width"))
    S = int(shard_size or lay["shard_size"])
    user = {k: v for k, v in attrs.items() if k not in ("schema_version", "layout")}
    tmp = new.parent / f".{new.name}.convert-{uuid.uuid4().hex}"
    damaged: dict[int, str] = {}
    converted = 0
    try:
        st = create_view_store(tmp, N, K, J, H, W, user, shard_size=S, compression=lay.get("compression"),
                               view_format=view_format, view_quality=view_quality)
        for s in range(st.n_shards):
            r = st.shard_range(s)
            block, bad = _read_block(old, arrays, r, K, J)
            damaged.update(bad)
            ok = block["done"] & ~np.isin(np.arange(r.start, r.stop), list(bad))

            def blobs(name: str, width: int) -> np.ndarray:
                rows = np.full((len(r), width), b"", dtype=object)
                for k in np.flatnonzero(ok):
                    rows[k] = [encode_view(im, view_format, view_quality) for im in block[name][k]]
                return rows

            st._write_shard(s, blobs("views", K) if K else None, block.get("noise_level"),
                            blobs("interp", J) if J else None, block.get("interp_partner"), block.get("interp_alpha"), ok)
            converted += int(ok.sum())
            problems = st.verify_shard(s)
            if problems:  # the new shard must be whole: anything else is a bug here, not damage there
                raise RuntimeError(f"converted shard {s} does not verify: {problems[0]}")
        _fsync_tree(tmp)
        if in_place:
            os.rename(old, backup)
        os.rename(tmp, new)
        _fsync_dir(new.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    files_before, bytes_before = _store_stats(backup if in_place else old)
    files_after, bytes_after = _store_stats(new)
    report = {"path": str(new), "sources": N, "converted": converted, "damaged": dict(sorted(damaged.items())),
              "files_before": files_before, "files_after": files_after, "bytes_before": bytes_before,
              "bytes_after": bytes_after}
    log(f"converted {old} -> {new}: {converted} of {N} sources ({view_format}"
        f"{f' q{view_quality}' if view_format == 'jpeg' else ''}, shards of {S}); {files_before} -> {files_after} files, "
        f"{bytes_before / 2**20:.1f} -> {bytes_after / 2**20:.1f} MiB" + (f"; old store kept as {backup}" if in_place else ""))
    if damaged:
        log(f"{len(damaged)} damaged source(s) written as not done (first: {list(damaged.items())[:3]}); rerun the "
            f"generation job with verify=true to regenerate them")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m genssl.data.convert_views", description=__doc__.split("\n\n")[0])
    ap.add_argument("old", help="the schema-1 views.zarr")
    ap.add_argument("new", help="where the converted store goes (the same path: in place)")
    ap.add_argument("--format", default="jpeg", choices=VIEW_FORMATS, help="image format of the views (jpeg)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality, 1..100 (95)")
    ap.add_argument("--shard-size", type=int, default=None, help="sources per shard (default: the old store's)")
    args = ap.parse_args(argv)
    try:
        convert_view_store(args.old, args.new, view_format=args.format, view_quality=args.quality,
                           shard_size=args.shard_size)
    except (ValueError, ViewStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
