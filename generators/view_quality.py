"""The view-quality report of a view store: do the generated views still look like their sources to
the stage-1 encoder the E-LDM was conditioned on? (docs/METHODS.md §1.4–1.5; docs/GENERATORS.md, "View-quality
report".)

A sample of ``n_sources`` finished sources (uniform, seeded) is read from the store; every view of
those sources is embedded with the frozen encoder exactly as the real images were, ``e = normalize(f0(I))``
with the E-LDM's recorded preprocessing (the views go through the same :class:`DaliEvalLoader`
resize/normalise as the dataset, written as lossless PNGs into a temporary folder), and compared with
the real embeddings (the cache of :func:`~genssl.generators.training.cached_embeddings`, i.e. the
very conditions the E-LDM saw). Reported:

* ``views`` (the K generated views per source): cosine between each view's embedding and its source's
  (mean, std, quantiles; per GenView noise level when there are several), and, when the data has
  labels, **k-NN label agreement**: the view's label predicted by DINO's weighted k-NN (k = 20,
  T = 0.07, as engine/knn.py) against the real training embeddings equals its source's label. The
  source itself is left out of the bank, so a view cannot win by matching its own source; the
  reference is the same number for the real images themselves (``real_leave_one_out``): a good
  generator comes close to it, a generator that drifts to other classes falls towards chance.
* ``interp`` (the J interpolated views, ``slerp(e_1, e_2; α)`` with α the weight on image 1): per α,
  the mean cosine of the view's embedding to parent 1 (the source) and to parent 2 (the partner), next
  to the same cosines of the slerp condition itself (what a perfect generator would reach).
  ``follows_alpha`` says whether ``cos(parent 1) − cos(parent 2)`` grows with α, as it should.
* ``noise_levels``: how many generated views of the whole store (every finished source, not only the
  sample) got each GenView noise level (``generators/foreground.noise_level_histogram``; with adaptive
  noise, the spread of the data set's foreground proportions over the 5 bins, docs/METHODS.md §2.2).
* ``baseline``: the mean cosine between random pairs of real images (and random pairs of one class),
  the scale against which the numbers above are read.

The report is written atomically to ``<store>.quality.json`` beside the store (not inside: a Zarr
group folder should hold only Zarr keys), with the key it was computed for (store fingerprint,
generator hash, number of finished sources, encoder, sample size, seed). :func:`store_quality_report`
returns that file's report without recomputing anything when the key matches, so a no-op rerun of the
generation recipe stays a no-op.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from genssl.data.index import DatasetIndex
from genssl.data.viewstore import ViewStore, open_view_store
from genssl.generators.conditioning import slerp
from genssl.generators.foreground import noise_level_histogram
from genssl.generators.training import EncoderInput, cached_embeddings, file_sha256

__all__ = ["REPORT_SUFFIX", "report_path", "store_noise_levels", "sample_sources", "embed_images", "knn_predict", "baseline_cosines",
           "view_quality", "format_report", "store_quality_report"]

REPORT_SUFFIX = ".quality.json"
SCHEMA_VERSION = 2  # 2: the noise-level histogram
KNN_K, KNN_TEMPERATURE = 20, 0.07  # the project's k-NN evaluation (engine/knn.py, DINO's protocol)
BASELINE_PAIRS = 4096
QUANTILES = {"q05": 0.05, "q25": 0.25, "median": 0.5, "q75": 0.75, "q95": 0.95}


def report_path(store_path: str | os.PathLike) -> Path:
    """``runs/views.zarr`` → ``runs/views.zarr.quality.json``."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + REPORT_SUFFIX)


def store_noise_levels(store: ViewStore) -> np.ndarray:
    """The noise level of every generated view of the finished sources, int64 ``[n_done·K]``."""
    levels = store.noise_level_array().astype(np.int64)
    return levels[store.done_mask()].reshape(-1)


# ------------------------------------------------------------------------------------------------
# sampling and embedding


def sample_sources(done: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` finished sources drawn uniformly without replacement (sorted); a pure function of
    (done mask, n, seed)."""
    finished = np.flatnonzero(done)
    if len(finished) == 0:
        raise ValueError("the view store has no finished source yet: run the generation first")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(finished, size=min(int(n), len(finished)), replace=False))


@torch.no_grad()
def embed_images(images: np.ndarray, backbone: torch.nn.Module, spec: EncoderInput, device: torch.device,
                 batch_size: int = 64, num_threads: int = 2) -> torch.Tensor:
    """``normalize(f0(x))`` of uint8 ``[n, H, W, 3]`` images, float32 ``[n, E]`` on ``device``.

    The images reach the encoder through the data set's own eval path: saved as PNG (lossless) and read
    back by :class:`DaliEvalLoader` with ``spec``'s side, centre crop and normalisation, the path
    :func:`cached_embeddings` took for the real images."""
    from PIL import Image

    from genssl.data.dali_loader import DaliEvalLoader

    n, h, w = images.shape[:3]
    out = torch.empty(n, backbone.embed_dim, device=device)
    with tempfile.TemporaryDirectory(prefix="genssl-view-quality-") as tmp:
        paths = [os.path.join(tmp, f"{r:07d}.png") for r in range(n)]
        for path, image in zip(paths, images):
            Image.fromarray(image).save(path, compress_level=1)
        index = DatasetIndex(root=Path(tmp), paths=paths, source_paths=[os.path.basename(p) for p in paths],
                             sizes=np.tile(np.array([[w, h]], np.int64), (n, 1)), labels=np.full(n, -1, np.int64),
                             classes=[], fingerprint="")
        loader = DaliEvalLoader(index, spec.size, batch_size, 0, 1,
                                device_id=device.index if device.type == "cuda" else None, num_threads=num_threads,
                                crop_ratio=spec.crop_ratio, mean=spec.mean, std=spec.std)
        backbone.eval()
        for batch, _, rows in loader:
            out[rows.to(device)] = F.normalize(backbone(batch.to(device)).float(), dim=-1)
    return out


# ------------------------------------------------------------------------------------------------
# statistics


def _summary(values: torch.Tensor) -> dict:
    v = values.double().cpu()
    out = {"n": int(v.numel()), "mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0}
    out.update({name: float(torch.quantile(v, q)) for name, q in QUANTILES.items()})
    return out


@torch.no_grad()
def knn_predict(queries: torch.Tensor, bank, bank_labels: np.ndarray, exclude: np.ndarray, num_classes: int,
                k: int = KNN_K, temperature: float = KNN_TEMPERATURE, chunk: int = 65536) -> torch.Tensor:
    """Class predicted for each query by DINO's weighted k-NN vote (the k most similar bank rows, weight
    ``exp(s/T)`` each, summed per class; as engine/knn.py), with query q's own source ``exclude[q]``
    and unlabelled rows (label −1) left out of the bank.

    ``queries`` float ``[n, E]`` (unit norm); ``bank`` ``[N, E]`` unit-norm rows (a memmap is read
    ``chunk`` rows at a time, never copied whole)."""
    device = queries.device
    labels = torch.as_tensor(np.asarray(bank_labels, dtype=np.int64), device=device)
    exclude = torch.as_tensor(np.asarray(exclude, dtype=np.int64), device=device)
    rows = torch.arange(len(queries), device=device)
    top_s = torch.empty(len(queries), 0, device=device)
    top_i = torch.empty(len(queries), 0, dtype=torch.int64, device=device)
    for start in range(0, len(bank), chunk):
        block = torch.from_numpy(np.array(bank[start:start + chunk], dtype=np.float32)).to(device)
        sim = queries.float() @ block.T
        sim[:, labels[start:start + len(block)] < 0] = -torch.inf
        own = (exclude >= start) & (exclude < start + len(block))
        sim[rows[own], exclude[own] - start] = -torch.inf
        s, i = sim.topk(min(k, len(block)), dim=1)
        top_s, pos = torch.cat([top_s, s], 1).topk(min(k, top_s.shape[1] + s.shape[1]), dim=1)
        top_i = torch.cat([top_i, i + start], 1).gather(1, pos)
    votes = torch.zeros(len(queries), num_classes, device=device)
    votes.scatter_add_(1, labels[top_i].clamp(min=0), (top_s / temperature).exp())  # exp(−inf) = 0: no vote
    return votes.argmax(dim=1)


def _rows(bank, rows: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.from_numpy(np.asarray(bank[rows], dtype=np.float32)).to(device)


def _agreement(queries: torch.Tensor, sources: np.ndarray, embeddings, labels: np.ndarray) -> float | None:
    """% of the queries whose k-NN label (their own source left out of the bank) is their source's label;
    None when no source is labelled."""
    mine = labels[sources] >= 0
    if not mine.any():
        return None
    pred = knn_predict(queries[torch.from_numpy(mine).to(queries.device)], embeddings, labels, sources[mine],
                       int(labels.max()) + 1)
    return 100.0 * float((pred.cpu().numpy() == labels[sources][mine]).mean())


def baseline_cosines(bank, labels: np.ndarray, n_pairs: int, seed: int) -> dict:
    """Cosines of ``n_pairs`` random pairs of distinct real images, and of random pairs of distinct
    images of one class (when there are labels)."""
    rng = np.random.default_rng([seed, 1])
    n = len(bank)
    if n < 2:
        return {}
    i = rng.integers(0, n, n_pairs)
    j = rng.integers(0, n - 1, n_pairs)
    out = {"random_pairs": _summary((_rows(bank, i) * _rows(bank, j + (j >= i))).sum(1))}
    members = [np.flatnonzero(labels == c) for c in np.unique(labels[labels >= 0])]
    members = [m for m in members if len(m) >= 2]
    if members:  # a class (with ≥ 2 images) and two of its images, uniformly
        c = rng.integers(0, len(members), n_pairs)
        a = np.array([rng.integers(0, len(members[x])) for x in c])
        b = np.array([rng.integers(0, len(members[x]) - 1) for x in c])
        b = b + (b >= a)
        first = np.array([members[x][y] for x, y in zip(c, a)])
        second = np.array([members[x][y] for x, y in zip(c, b)])
        out["same_class_pairs"] = _summary((_rows(bank, first) * _rows(bank, second)).sum(1))
    return out


# ------------------------------------------------------------------------------------------------
# the report


def view_quality(store: ViewStore, labels: np.ndarray, embeddings, backbone: torch.nn.Module, spec: EncoderInput,
                 device: torch.device, n_sources: int = 256, seed: int = 0, batch_size: int = 64,
                 num_threads: int = 2) -> dict:
    """The report's numbers (one process; see the module docstring).

    ``labels`` int ``[N]`` of the data set (−1 = unlabelled) and ``embeddings`` ``[N, E]`` its real
    embeddings (unit norm, the E-LDM's conditions), in the store's source order."""
    t0 = time.perf_counter()
    device = torch.device(device)
    labels = np.asarray(labels, dtype=np.int64)
    if len(embeddings) != store.n_sources or len(labels) != store.n_sources:
        raise ValueError(f"{len(embeddings)} embeddings / {len(labels)} labels for a store of {store.n_sources} "
                         f"sources: pass the data set the store was generated from")
    src = sample_sources(store.done_mask(), n_sources, seed)
    K, J = store.views_per_image, store.interp_per_image
    e_src = _rows(embeddings, src, device)  # [n, E]
    has_labels = len(np.unique(labels[labels >= 0])) >= 2
    report = {"sample": {"n_sources": len(src), "seed": int(seed)}, "views": None, "interp": None}

    if has_labels:
        report["knn"] = {"k": KNN_K, "temperature": KNN_TEMPERATURE,
                         "real_leave_one_out": _agreement(e_src, src, embeddings, labels)}
    else:
        report["knn"] = None  # no labels (a flat folder) or a single class: agreement means nothing

    if K:
        views = np.stack([store.views(int(i)) for i in src])  # [n, K, H, W, 3]
        levels = np.stack([store.noise_levels(int(i)) for i in src]).reshape(-1)  # [n·K]
        e_view = embed_images(views.reshape(-1, *views.shape[2:]), backbone, spec, device, batch_size, num_threads)
        parent = np.repeat(src, K)
        cos = (e_view * e_src.repeat_interleave(K, 0)).sum(1)
        report["views"] = {"cosine_to_source": _summary(cos), "noise_levels": noise_level_histogram(store_noise_levels(store))}
        if len(np.unique(levels)) > 1 or levels[0] != 0:
            report["views"]["by_noise_level"] = {str(int(lv)): _summary(cos[torch.from_numpy(levels == lv).to(device)])
                                                 for lv in np.unique(levels)}
        if has_labels:
            report["views"]["knn_agreement"] = _agreement(e_view, parent, embeddings, labels)

    if J:
        records = [store.interp(int(i)) for i in src]
        images = np.stack([r[0] for r in records]).reshape(-1, store.height, store.width, 3)  # [n·J, H, W, 3]
        partners = np.concatenate([r[1] for r in records]).astype(np.int64)
        alphas = np.concatenate([r[2] for r in records]).astype(np.float64)
        e_int = embed_images(images, backbone, spec, device, batch_size, num_threads)
        e1 = e_src.repeat_interleave(J, 0)
        e2 = _rows(embeddings, partners, device)
        target = slerp(e1, e2, torch.from_numpy(alphas).to(device)).float()  # the condition each view was drawn from
        cos1, cos2 = (e_int * e1).sum(1), (e_int * e2).sum(1)
        by_alpha = []
        buckets = alphas.round(4)  # α is stored as float32: 0.2 → 0.20000000298
        for a in np.unique(buckets):
            m = torch.from_numpy(buckets == a).to(device)
            by_alpha.append({"alpha": float(a), "n": int(m.sum()), "cos_parent1": float(cos1[m].mean()),
                             "cos_parent2": float(cos2[m].mean()),
                             "slerp_cos_parent1": float((target[m] * e1[m]).sum(1).mean()),
                             "slerp_cos_parent2": float((target[m] * e2[m]).sum(1).mean())})
        gaps = [b["cos_parent1"] - b["cos_parent2"] for b in by_alpha]
        report["interp"] = {"n": len(alphas), "by_alpha": by_alpha,
                            "follows_alpha": bool(np.all(np.diff(gaps) > 0)) if len(gaps) > 1 else None}

    report["baseline"] = baseline_cosines(embeddings, labels, BASELINE_PAIRS, seed)
    report["seconds"] = time.perf_counter() - t0
    return report


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} %"


def format_report(report: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"view quality of {report['sample']['n_sources']} of {report['store']['n_done']} finished sources "
             f"(cosines of stage-1 embeddings; {report['path']}):"]
    base = report["baseline"]
    if base:
        scale = f"  scale: random pairs of real images {base['random_pairs']['mean']:.3f}"
        if "same_class_pairs" in base:
            scale += f", random pairs of one class {base['same_class_pairs']['mean']:.3f}"
        lines.append(scale)
    knn, views, interp = report["knn"], report["views"], report["interp"]
    if views:
        c = views["cosine_to_source"]
        lines.append(f"  generated views: cos to source {c['mean']:.3f} ± {c['std']:.3f} "
                     f"(q05 {c['q05']:.3f}, median {c['median']:.3f}, q95 {c['q95']:.3f})")
        hist = views.get("noise_levels") or {}
        lines.append(f"  noise levels of all {sum(hist.values())} generated views: "
                     + ", ".join(f"{level}: {n}" for level, n in sorted(hist.items(), key=lambda kv: int(kv[0]))))
        for level, c in views.get("by_noise_level", {}).items():
            lines.append(f"    noise level {level}: cos to source {c['mean']:.3f} ({c['n']} views)")
        if knn:
            lines.append(f"  k-NN label agreement with the source (k={knn['k']}, T={knn['temperature']}): "
                         f"views {_pct(views['knn_agreement'])}; "
                         f"real images, leave-one-out {_pct(knn['real_leave_one_out'])}")
    if interp:
        lines.append("  interpolated views:   α     n   cos→parent1  cos→parent2   (slerp condition: p1, p2)")
        for b in interp["by_alpha"]:
            lines.append(f"                      {b['alpha']:4.2f} {b['n']:5d}    {b['cos_parent1']:.3f}        "
                         f"{b['cos_parent2']:.3f}        ({b['slerp_cos_parent1']:.3f}, {b['slerp_cos_parent2']:.3f})")
        follows = {True: "yes", False: "NO", None: "n/a (one α)"}[interp["follows_alpha"]]
        lines.append(f"  cos→parent1 − cos→parent2 grows with α (the weight on parent 1): {follows}")
    return "\n".join(lines)


def _report_key(store: ViewStore, n_done: int, encoder: dict, n_sources: int, seed: int) -> dict:
    return {"schema_version": SCHEMA_VERSION, "fingerprint": store.fingerprint, "generator_hash": store.generator_hash,
            "n_done": int(n_done), "encoder_sha256": encoder["sha256"], "encoder_input": encoder["input"],
            "n_sources": int(n_sources), "seed": int(seed), "knn": [KNN_K, KNN_TEMPERATURE]}


def store_quality_report(store_path: str | os.PathLike, index: DatasetIndex, dist,
                         encoder: str | os.PathLike | None = None, input_spec: EncoderInput | None = None, n_sources: int = 256, seed: int = 0,
                         batch_size: int = 64, num_threads: int = 2, cache_dir: str | os.PathLike | None = None,
                         log: Callable[[str], None] | None = print) -> dict:
    """The report of the store at ``store_path`` (views of ``index``, its train split), computed on rank
    0 and written to :func:`report_path`, or read from there when it is current. Every rank must call
    it (the embedding cache is collective); every rank gets the report.

    ``encoder`` / ``input_spec`` default to what the store recorded (``attrs["encoder"]``: path, sha256,
    preprocessing, written by recipes/generate_views.py); an encoder whose file differs from the recorded
    one is refused — the views must be judged by the encoder whose embeddings conditioned them.
    """
    from genssl.engine.atomic import write_json_atomic
    from genssl.engine.distributed import broadcast_object
    from genssl.engine.export import load_encoder, resolve_encoder_path

    store = open_view_store(store_path, "r", expect_fingerprint=index.fingerprint)
    recorded = store.attrs.get("encoder") or {}
    if encoder is None and not recorded.get("path"):
        raise ValueError(f"view store {store_path} does not record its encoder; pass encoder= (the stage-1 run "
                         f"whose embeddings conditioned the E-LDM)")
    if input_spec is None and not recorded.get("input"):
        raise ValueError(f"view store {store_path} does not record the encoder's preprocessing; pass input_spec=")
    spec = input_spec or EncoderInput.from_dict(recorded["input"])
    n_done = store.n_done()
    path = report_path(store_path)

    current = None
    if dist.is_main and path.is_file() and recorded.get("sha256"):
        old = json.loads(path.read_text())
        key = _report_key(store, n_done, {"sha256": recorded["sha256"], "input": spec.to_dict()}, n_sources, seed)
        if old.get("key") == key:  # the same views judged the same way; the folder may have moved since
            current = {**old, "path": str(path), "store": {**old["store"], "path": str(Path(store_path).resolve())}}
    current = broadcast_object(current)
    if current is not None:
        return current

    encoder_file = resolve_encoder_path(encoder or recorded["path"])
    sha = file_sha256(encoder_file)
    if recorded.get("sha256") and sha != recorded["sha256"]:
        raise ValueError(f"the encoder at {encoder_file} (sha256 {sha[:16]}…) is not the one whose embeddings "
                         f"generated view store {store_path} ({recorded['sha256'][:16]}…); pass encoder= that file")
    embeddings, info = cached_embeddings(encoder_file, index, dist, batch_size=batch_size, num_threads=num_threads,
                                         cache_dir=cache_dir, log=log, input_spec=spec)
    report = None
    if dist.is_main:
        try:
            backbone, _ = load_encoder(info["path"], dist.device)
            numbers = view_quality(store, index.labels, embeddings, backbone, spec, dist.device, n_sources, seed,
                                   batch_size, num_threads)
            del backbone
            report = {"key": _report_key(store, n_done, info, n_sources, seed), "path": str(path),
                      "store": {"path": str(Path(store_path).resolve()), "n_sources": store.n_sources,
                                "n_done": n_done, "views_per_image": store.views_per_image,
                                "interp_per_image": store.interp_per_image},
                      "encoder": {"path": info["path"], "sha256": info["sha256"], "input": info["input"]}, **numbers}
            write_json_atomic(path, report)
        except ValueError as e:  # raised on every rank below, so none waits for rank 0 forever
            report = e
    report = broadcast_object(report)
    if isinstance(report, Exception):
        raise report
    return report
