"""The view-quality report tells a good generator from a weak one.

Real parts, tiny sizes: a 3-class ImageFolder of 16 px images (one colour per class, pixel noise per
image), a randomly initialised ViT-Tiny/8 exported with save_encoder, the real embedding cache, view
stores written with data/viewstore.py's API. The "generators" are stand-ins with a known answer:
views that copy their source (cosine 1, agreement 100 %), views of pure noise and views that are another
class's image (low); interpolated views that are pixel blends with weight α on parent 1 (the trend
must follow α) or with the weights swapped (it must not).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genssl.data.index import build_index
from genssl.data.viewstore import create_view_store, open_view_store
from genssl.engine.distributed import DistInfo
from genssl.engine.export import save_encoder
from genssl.engine.knn import knn_classify
from genssl.generators import view_quality as vq
from genssl.generators.training import EncoderInput, file_sha256
from genssl.models.backbones import build_backbone

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 220)]
PER_CLASS, SIDE = 8, 16
N = PER_CLASS * len(COLOURS)
ALPHAS = (0.2, 0.4, 0.6, 0.8)
SPEC = EncoderInput(SIDE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DIST = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("view_quality")
    rng = np.random.default_rng(0)
    for c, colour in enumerate(COLOURS):
        folder = root / "data" / f"class{c}"
        folder.mkdir(parents=True)
        for k in range(PER_CLASS):
            pixels = np.asarray(colour, float)[None, None] + rng.normal(0, 25, (SIDE, SIDE, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{k}.png")
    index = build_index(root / "data", root / "cache")
    (root / "encoder").mkdir()
    torch.manual_seed(0)
    path = save_encoder(build_backbone("vit_tiny", img_size=SIDE, patch_size=8), root / "encoder",
                        {"eval": {"size": SIDE}})
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in index.paths])
    return {"root": root, "index": index, "encoder": path, "sha": file_sha256(path), "images": images}


def partner(i: int) -> int:
    return (i + PER_CLASS) % N  # an image of the next class


def blend(a: np.ndarray, b: np.ndarray, weight_on_a: float) -> np.ndarray:
    return np.clip(weight_on_a * a.astype(float) + (1 - weight_on_a) * b, 0, 255).round().astype(np.uint8)


def make_store(world: dict, name: str, view_of, interp_of=None) -> Path:
    """A store with K=1 view per source (``view_of(i)``) and, when ``interp_of(i, p, α)`` is given, J=1
    interpolated view with partner ``partner(i)`` and α cycling through ALPHAS."""
    path = world["root"] / f"{name}.zarr"
    J = 1 if interp_of else 0
    attrs = {"fingerprint": world["index"].fingerprint, "generator_hash": name,
             "encoder": {"path": str(world["encoder"]), "sha256": world["sha"], "input": SPEC.to_dict()}}
    store = create_view_store(path, N, 1, J, SIDE, SIDE, attrs, shard_size=8, view_format="png")
    for i in range(N):
        p, a = partner(i), ALPHAS[i % len(ALPHAS)]
        interp = dict(interp=interp_of(i, p, a)[None], partners=[p], alphas=[a]) if J else {}
        store.write_source(i, view_of(i)[None], [0], durable=False, **interp)
    return path


def report(world: dict, path: Path, **kw) -> dict:
    return vq.store_quality_report(path, world["index"], DIST, cache_dir=world["root"] / "cache", log=None, **kw)


def test_copies_of_the_source_score_high_and_noise_or_other_class_views_score_low(world) -> None:
    images = world["images"]
    noise = np.random.default_rng(1).integers(0, 256, (N, SIDE, SIDE, 3), dtype=np.uint8)
    copy = report(world, make_store(world, "copy", lambda i: images[i]))
    noisy = report(world, make_store(world, "noise", lambda i: noise[i]))
    other = report(world, make_store(world, "other", lambda i: images[partner(i)]))

    # the real images' own leave-one-out agreement: the classes are easy for this encoder
    assert copy["knn"]["real_leave_one_out"] == 100.0
    same_class = copy["baseline"]["same_class_pairs"]["mean"]
    assert copy["baseline"]["random_pairs"]["mean"] < same_class
    # a perfect generator: the view embeds like its source
    assert copy["views"]["cosine_to_source"]["q05"] > 0.999 and copy["views"]["knn_agreement"] == 100.0
    # a weak generator shows up: far from its source (below two images of one class), wrong class
    assert noisy["views"]["cosine_to_source"]["mean"] < 0.5 < same_class
    assert noisy["views"]["knn_agreement"] <= 50.0
    assert other["views"]["cosine_to_source"]["mean"] < 0.5 and other["views"]["knn_agreement"] == 0.0
    assert "k-NN label agreement" in vq.format_report(noisy)


def test_interpolated_views_are_judged_per_alpha(world) -> None:
    images = world["images"]
    good = report(world, make_store(world, "blend", lambda i: images[i],
                                    lambda i, p, a: blend(images[i], images[p], a)))
    swapped = report(world, make_store(world, "swapped", lambda i: images[i],
                                       lambda i, p, a: blend(images[p], images[i], a)))

    buckets = good["interp"]["by_alpha"]
    assert [b["alpha"] for b in buckets] == list(ALPHAS) and sum(b["n"] for b in buckets) == N
    cos1 = [b["cos_parent1"] for b in buckets]
    cos2 = [b["cos_parent2"] for b in buckets]
    assert np.all(np.diff(cos1) > 0) and np.all(np.diff(cos2) < 0)
    assert good["interp"]["follows_alpha"] is True
    # the slerp condition itself follows α by construction (the yardstick printed next to the views)
    assert np.all(np.diff([b["slerp_cos_parent1"] for b in buckets]) > 0)
    # a generator that puts α on the wrong parent is flagged
    assert swapped["interp"]["follows_alpha"] is False
    assert np.all(np.diff([b["cos_parent1"] for b in swapped["interp"]["by_alpha"]]) < 0)
    assert "grows with α (the weight on parent 1): NO" in vq.format_report(swapped)


def test_report_is_written_beside_the_store_and_reused_while_current(world, monkeypatch) -> None:
    images = world["images"]
    path = make_store(world, "reuse", lambda i: images[i], lambda i, p, a: blend(images[i], images[p], a))
    first = report(world, path, n_sources=10)
    file = path.with_name("reuse.zarr.quality.json")
    assert vq.report_path(path) == file and json.loads(file.read_text()) == first
    assert first["sample"]["n_sources"] == 10 and first["views"]["cosine_to_source"]["n"] == 10
    assert first["store"]["n_done"] == N and first["encoder"]["sha256"] == world["sha"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("a current report was recomputed")

    monkeypatch.setattr(vq, "view_quality", must_not_run)
    assert report(world, path, n_sources=10) == first  # same store, same settings: read back, not recomputed
    moved = path.with_name("moved.zarr")  # a copied run folder: still current, reported at its new place
    shutil.copytree(path, moved)
    shutil.copy(file, vq.report_path(moved))
    assert report(world, moved, n_sources=10)["path"] == str(vq.report_path(moved))
    open_view_store(path, "r+").invalidate([3])  # the store changed: the report is stale
    with pytest.raises(AssertionError, match="recomputed"):
        report(world, path, n_sources=10)
    with pytest.raises(AssertionError, match="recomputed"):
        report(world, path, n_sources=11)


def test_an_encoder_other_than_the_stores_is_refused(world, tmp_path) -> None:
    torch.manual_seed(1)
    other = save_encoder(build_backbone("vit_tiny", img_size=SIDE, patch_size=8), tmp_path, {"eval": {"size": SIDE}})
    path = make_store(world, "refuse", lambda i: world["images"][i])
    with pytest.raises(ValueError, match="is not the one whose embeddings generated view store"):
        report(world, path, encoder=other)


def test_knn_predict_votes_like_the_projects_knn_and_leaves_the_source_out() -> None:
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    labels = torch.randint(0, 5, (300,), generator=g)
    queries = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
    truth = torch.randint(0, 5, (40,), generator=g)
    # nothing to leave out (-1): the same vote as engine/knn.py, with the bank read in chunks
    pred = vq.knn_predict(queries, bank.numpy(), labels.numpy(), np.full(40, -1), 5, chunk=64)
    ref = knn_classify(bank, labels, queries, truth, k=vq.KNN_K, temperature=vq.KNN_TEMPERATURE)
    assert 100.0 * float((pred == truth).float().mean()) == pytest.approx(ref["knn_top1"])
    # a query that is a bank row: its own row would decide alone at T=0.07 with k=1; left out, it cannot
    rows = np.arange(40)
    own = vq.knn_predict(bank[:40], bank.numpy(), labels.numpy(), rows, 5, k=1, chunk=64)
    assert not torch.equal(own, labels[:40])
    nearest_other = (bank[:40] @ bank.T).scatter(1, torch.from_numpy(rows)[:, None], -2.0).argmax(1)
    assert torch.equal(own, labels[nearest_other])
