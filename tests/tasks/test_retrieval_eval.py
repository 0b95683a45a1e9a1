"""Image-text retrieval recall@K: hand-ranked matrices, the tie rule, score files, annotations, the CLI.

Every expected recall is worked out by hand in the comments. Ranks are 0-based:
a query's rank is the number of wrong candidates scoring at least as high as its
best right one, and recall@K is the share of queries with rank < K.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fusionzoo.cli import main
from fusionzoo.tasks import retrieval_eval
from fusionzoo.tasks.retrieval_eval import (
    RetrievalScores,
    i2t_ranks,
    load_retrieval_annotations,
    load_scores,
    recall_at_k,
    save_scores,
    score_retrieval,
    t2i_ranks,
    top_k_chunked,
)
from fusionzoo.tasks.vqa_eval import ScoreInputError

KEYS = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"]

# --------------------------------------------------------------------------------------
# 3 images x 6 captions, two captions per image, no ties
# --------------------------------------------------------------------------------------
TEXT_IMAGE = np.array([0, 0, 1, 1, 2, 2])  # captions 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2

I2T = np.array([
    # c0   c1   c2   c3   c4   c5
    [0.9, 0.1, 0.8, 0.2, 0.3, 0.4],  # image 0: best own c0 = .9, no other caption >= .9 -> rank 0
    [0.7, 0.6, 0.5, 0.1, 0.9, 0.8],  # image 1: best own c2 = .5; c0 .7, c1 .6, c4 .9, c5 .8 above -> rank 4
    [0.5, 0.4, 0.3, 0.2, 0.1, 0.6],  # image 2: best own c5 = .6, nothing above -> rank 0
])
T2I = np.array([
    # i0    i1    i2
    [0.9, 0.1, 0.2],    # c0 -> i0 .9: rank 0
    [0.3, 0.5, 0.4],    # c1 -> i0 .3: i1 .5, i2 .4 above -> rank 2
    [0.2, 0.8, 0.1],    # c2 -> i1 .8: rank 0
    [0.6, 0.5, 0.7],    # c3 -> i1 .5: i0 .6, i2 .7 above -> rank 2
    [0.4, 0.3, 0.35],   # c4 -> i2 .35: i0 .4 above -> rank 1
    [0.1, 0.2, 0.3],    # c5 -> i2 .3: rank 0
])
IMAGE_IDS = [101, 202, 303]
CAPTION_IDS = [11, 12, 21, 22, 31, 32]  # caption 10*k + j is image k's j-th


def test_ranks_by_hand() -> None:
    assert i2t_ranks(I2T, TEXT_IMAGE).tolist() == [0, 4, 0]
    assert t2i_ranks(T2I, TEXT_IMAGE).tolist() == [0, 2, 0, 2, 1, 0]


def test_recall_default_ks_by_hand() -> None:
    scores = recall_at_k(I2T, T2I, TEXT_IMAGE)
    assert list(scores) == KEYS
    # image ranks [0, 4, 0]: R@1 = 2/3; R@5 = R@10 = 3/3
    # caption ranks [0, 2, 0, 2, 1, 0]: R@1 = 3/6; R@5 = R@10 = 6/6
    # r_mean = (66.67 + 100 + 100 + 50 + 100 + 100) / 6 = 516.67 / 6 = 86.11
    assert scores == pytest.approx({"txt_r1": 200 / 3, "txt_r5": 100.0, "txt_r10": 100.0,
                                    "img_r1": 50.0, "img_r5": 100.0, "img_r10": 100.0,
                                    "r_mean": (200 / 3 + 50 + 400) / 6})


def test_recall_other_ks_by_hand() -> None:
    scores = recall_at_k(I2T, T2I, TEXT_IMAGE, ks=(1, 2, 3))
    assert list(scores) == ["txt_r1", "txt_r2", "txt_r3", "img_r1", "img_r2", "img_r3", "r_mean"]
    # image ranks [0, 4, 0]: rank < 1, 2 and 3 all hold for 2 of 3 images
    # caption ranks [0, 2, 0, 2, 1, 0]: < 1: 3 of 6; < 2: 4 of 6; < 3: 6 of 6
    # r_mean = (3 x 66.67 + 50 + 66.67 + 100) / 6 = 416.67 / 6 = 69.44
    assert scores == pytest.approx({"txt_r1": 200 / 3, "txt_r2": 200 / 3, "txt_r3": 200 / 3,
                                    "img_r1": 50.0, "img_r2": 200 / 3, "img_r3": 100.0,
                                    "r_mean": (4 * 200 / 3 + 150) / 6})


def test_recall_with_ranks_zero_to_eleven() -> None:
    # 12 images, one caption each; caption c's image is beaten by exactly c other images,
    # and image i's caption by exactly i other captions: ranks 0..11 both ways.
    n = 12
    t2i = np.zeros((n, n))
    for c in range(n):
        t2i[c, c] = 0.5
        t2i[c, [j for j in range(n) if j != c][:c]] = 1.0
    i2t = t2i.copy()  # the same construction, read as image queries over captions
    scores = recall_at_k(i2t, t2i, np.arange(n))
    # ranks 0..11: R@1 = 1/12 = 8.33, R@5 = 5/12 = 41.67, R@10 = 10/12 = 83.33 in each direction
    expected = {"r1": 100 / 12, "r5": 500 / 12, "r10": 1000 / 12}
    assert scores == pytest.approx({**{f"txt_{k}": v for k, v in expected.items()},
                                    **{f"img_{k}": v for k, v in expected.items()},
                                    "r_mean": 1600 / 36})


def test_torch_tensors_and_lists_are_accepted() -> None:
    from_torch = recall_at_k(torch.tensor(I2T, dtype=torch.bfloat16), torch.tensor(T2I), torch.tensor(TEXT_IMAGE))
    assert from_torch == recall_at_k(I2T.tolist(), T2I.tolist(), TEXT_IMAGE.tolist())


# --------------------------------------------------------------------------------------
# The tie rule: a wrong candidate tied with the best right one ranks above it
# --------------------------------------------------------------------------------------
def test_ties_count_against_the_query() -> None:
    text_image = np.array([0, 0, 1, 1])
    i2t = np.array([[0.9, 0.9, 0.2, 0.1],    # image 0: its own c0, c1 tie each other at the top -> rank 0
                    [0.7, 0.3, 0.7, 0.7]])   # image 1: own best .7 (c2, c3) tied with wrong c0 -> rank 1
    t2i = np.array([[0.5, 0.5],              # c0 -> i0 .5 tied with wrong i1 -> rank 1
                    [0.6, 0.4],              # c1 -> i0: rank 0
                    [0.4, 0.4],              # c2 -> i1 .4 tied with i0 -> rank 1
                    [0.1, 0.2]])             # c3 -> i1: rank 0
    assert i2t_ranks(i2t, text_image).tolist() == [0, 1]
    assert t2i_ranks(t2i, text_image).tolist() == [1, 0, 1, 0]
    # the rule ignores order: the same ranks with captions reversed and images swapped
    caption_order, image_order = [3, 2, 1, 0], [1, 0]
    swapped = np.array([image_order.index(i) for i in text_image[caption_order]])
    assert i2t_ranks(i2t[image_order][:, caption_order], swapped).tolist() == [1, 0]
    assert t2i_ranks(t2i[caption_order][:, image_order], swapped).tolist() == [0, 1, 0, 1]


def test_constant_scores_get_no_credit() -> None:
    # every pair scores 0: image queries have 4 tied wrong captions (rank 4), caption
    # queries 2 tied wrong images (rank 2)
    scores = recall_at_k(np.zeros((3, 6)), np.zeros((6, 3)), TEXT_IMAGE, ks=(1, 3, 5))
    assert scores == {"txt_r1": 0.0, "txt_r3": 0.0, "txt_r5": 100.0,
                      "img_r1": 0.0, "img_r3": 100.0, "img_r5": 100.0, "r_mean": 50.0}


def test_minus_infinity_masks_and_nan_is_refused() -> None:
    i2t = np.full((3, 6), -np.inf)
    i2t[[0, 1, 2], [1, 3, 5]] = 1.0  # one scored caption per image (an ALBEF-style shortlist), the right one
    t2i = np.where(np.eye(3)[TEXT_IMAGE] == 1, 1.0, -np.inf)
    assert recall_at_k(i2t, t2i, TEXT_IMAGE)["r_mean"] == 100.0
    # an image whose own captions are all masked ties every masked wrong caption: rank 4
    i2t[1, 3] = -np.inf
    assert i2t_ranks(i2t, TEXT_IMAGE).tolist() == [0, 4, 0]
    t2i[4, 1] = np.nan
    with pytest.raises(ScoreInputError, match=r"<t2i>, t2i\[4\]: row 4 holds NaN"):
        recall_at_k(I2T, t2i, TEXT_IMAGE)


@pytest.mark.parametrize(("args", "message"), [
    ((I2T, T2I[:5], TEXT_IMAGE[:5]), r"array 't2i' has shape \(5, 3\); expected 't2i' of shape"),
    ((I2T, T2I, TEXT_IMAGE[:5]), r"text_image has shape \(5,\)"),
    ((I2T, T2I, np.array([0, 0, 1, 1, 3, 2])), r"text_image\[4\]: caption 4 names image index 3"),
    ((I2T, T2I, np.array([0, 0, 0, 0, 2, 2])), r"image index 1 has no caption"),
    ((I2T[0], T2I, TEXT_IMAGE), r"array 'i2t' has shape \(6,\)"),
])
def test_recall_input_errors(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ScoreInputError, match=message):
        recall_at_k(*args)
    with pytest.raises(ScoreInputError, match="distinct integers, each at least 1"):
        recall_at_k(I2T, T2I, TEXT_IMAGE, ks=(1, 0))


# --------------------------------------------------------------------------------------
# Permuting the score file changes nothing
# --------------------------------------------------------------------------------------
def test_permuted_rows_and_columns_give_the_same_recalls() -> None:
    rng = np.random.default_rng(0)
    n_images, per_image = 20, 5
    text_image = np.repeat(np.arange(n_images), per_image)
    # one decimal: many ties, so the tie rule is exercised too
    i2t = np.round(rng.random((n_images, n_images * per_image)), 1)
    t2i = np.round(rng.random((n_images * per_image, n_images)), 1)
    reference = recall_at_k(i2t, t2i, text_image)
    for _ in range(3):
        rows, cols = rng.permutation(n_images), rng.permutation(n_images * per_image)
        new_row = np.argsort(rows)  # image rows[r] now sits at row r
        permuted = recall_at_k(i2t[rows][:, cols], t2i[cols][:, rows], new_row[text_image[cols]])
        assert permuted == reference


# --------------------------------------------------------------------------------------
# Chunked top-k
# --------------------------------------------------------------------------------------
def _full_top_k(query: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: the whole matrix, sorted by score descending, then index ascending."""
    full = query @ gallery.T
    order = np.lexsort((np.broadcast_to(np.arange(len(gallery)), full.shape), -full), axis=1)[:, :k]
    return order, np.take_along_axis(full, order, axis=1)


# integer entries in -1..1: exact dot products with many ties
TOPK_QUERY = np.random.default_rng(1).integers(-1, 2, size=(9, 4)).astype(np.float32)
TOPK_GALLERY = np.random.default_rng(2).integers(-1, 2, size=(13, 4)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 3, 13, 20])
@pytest.mark.parametrize(("chunk", "gallery_chunk"), [(1, None), (4, None), (100, None), (1, 1), (2, 3), (4, 13),
                                                      (9, 50)])
def test_top_k_chunked_equals_full_top_k(k: int, chunk: int, gallery_chunk: int | None) -> None:
    want_index, want_score = _full_top_k(TOPK_QUERY, TOPK_GALLERY, k)
    index, score = top_k_chunked(torch.from_numpy(TOPK_QUERY), torch.from_numpy(TOPK_GALLERY), k,
                                 chunk=chunk, gallery_chunk=gallery_chunk)
    assert index.dtype == torch.long and tuple(index.shape) == (9, min(k, 13))
    assert index.numpy().tolist() == want_index.tolist()
    assert score.numpy().tolist() == want_score.tolist()


def test_top_k_chunked_without_ties_matches_torch_topk() -> None:
    generator = torch.Generator().manual_seed(0)
    query, gallery = torch.randn(37, 16, generator=generator), torch.randn(301, 16, generator=generator)
    want = torch.topk(query @ gallery.T, 25, dim=1)
    for chunk, gallery_chunk in ((8, None), (37, 64), (5, 7)):
        index, score = top_k_chunked(query, gallery, 25, chunk=chunk, gallery_chunk=gallery_chunk)
        assert torch.equal(index, want.indices)
        torch.testing.assert_close(score, want.values)


def test_top_k_ties_by_hand_and_numpy_in_numpy_out() -> None:
    query = np.array([[1.0, 0.0]])
    gallery = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.0], [1.0, 5.0], [0.5, 9.0]])
    # scores 0, 1, .5, 1, .5: the two 1s in gallery order (1, 3), then the two .5s (2, 4)
    index, score = top_k_chunked(query, gallery, 3, chunk=1, gallery_chunk=2)
    assert isinstance(index, np.ndarray) and index.tolist() == [[1, 3, 2]]
    assert score.tolist() == [[1.0, 1.0, 0.5]]


def test_top_k_holds_one_bounded_block(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes: list[tuple[int, int]] = []
    real = retrieval_eval._block_scores

    def spy(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        shapes.append((rows.shape[0], columns.shape[0]))
        return real(rows, columns)

    monkeypatch.setattr(retrieval_eval, "_block_scores", spy)
    top_k_chunked(torch.from_numpy(TOPK_QUERY), torch.from_numpy(TOPK_GALLERY), 5, chunk=4, gallery_chunk=5)
    # 9 queries in blocks of 4, 4, 1; 13 gallery items in blocks of 5, 5, 3
    assert shapes == [(q, g) for q in (4, 4, 1) for g in (5, 5, 3)]


def test_top_k_errors() -> None:
    with pytest.raises(ScoreInputError, match="one width E"):
        top_k_chunked(torch.zeros(2, 3), torch.zeros(4, 5), 1)
    with pytest.raises(ScoreInputError, match="k is 0"):
        top_k_chunked(torch.zeros(2, 3), torch.zeros(4, 3), 0)
    with pytest.raises(ScoreInputError, match="query 1 is NaN"):
        top_k_chunked(torch.tensor([[1.0], [float("nan")]]), torch.ones(4, 1), 2)


# --------------------------------------------------------------------------------------
# Score files
# --------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path: Path) -> None:
    path = save_scores(tmp_path / "sub" / "scores.npz", torch.tensor(I2T), T2I, IMAGE_IDS, CAPTION_IDS)
    assert path == tmp_path / "sub" / "scores.npz"
    assert [p.name for p in path.parent.iterdir()] == ["scores.npz"]  # no temporary file left behind
    loaded = load_scores(path)
    assert isinstance(loaded, RetrievalScores) and loaded.file == str(path)
    assert np.array_equal(loaded.i2t, I2T) and np.array_equal(loaded.t2i, T2I)
    assert loaded.image_ids.tolist() == IMAGE_IDS and loaded.caption_ids.tolist() == CAPTION_IDS


def test_save_refuses_bad_arrays_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ScoreInputError, match=r"array 'i2t' has shape \(3, 5\); expected 'i2t' of shape "
                                              r"\(len\(image_ids\), len\(caption_ids\)\) = \(3, 6\)"):
        save_scores(tmp_path / "scores.npz", I2T[:, :5], T2I, IMAGE_IDS, CAPTION_IDS)
    with pytest.raises(ScoreInputError, match=r"caption_ids\[3\]: id 12 appears twice \(first at caption_ids\[1\]\)"):
        save_scores(tmp_path / "scores.npz", I2T, T2I, IMAGE_IDS, [11, 12, 21, 12, 31, 32])
    assert list(tmp_path.iterdir()) == []


def _npz(path: Path, **arrays: Any) -> Path:
    with path.open("wb") as handle:
        np.savez(handle, **arrays)
    return path


@pytest.mark.parametrize(("arrays", "message"), [
    ({"i2t": I2T, "image_ids": IMAGE_IDS, "caption_ids": CAPTION_IDS},
     r"missing array 't2i' \(the archive holds \['caption_ids', 'i2t', 'image_ids'\]\)"),
    ({"i2t": I2T, "t2i": T2I.T, "image_ids": IMAGE_IDS, "caption_ids": CAPTION_IDS},
     r"array 't2i' has shape \(3, 6\); expected 't2i' of shape \(len\(caption_ids\), len\(image_ids\)\) = \(6, 3\)"),
    ({"i2t": np.where(np.arange(6) == 2, np.nan, I2T), "t2i": T2I, "image_ids": IMAGE_IDS, "caption_ids": CAPTION_IDS},
     r"i2t\[0\]: row 0 \(image_id=101\) holds NaN \(3 of 3 rows do\)"),
    ({"i2t": I2T, "t2i": T2I, "image_ids": np.array(IMAGE_IDS, dtype=float), "caption_ids": CAPTION_IDS},
     r"array 'image_ids' has shape \(3,\) and dtype float64; expected 'image_ids' to be a 1-D array of integer"),
    ({"i2t": I2T, "t2i": T2I, "image_ids": np.array(IMAGE_IDS, dtype=object), "caption_ids": CAPTION_IDS},
     r"array 'image_ids' cannot be read"),
])
def test_load_errors_name_the_file_and_array(tmp_path: Path, arrays: dict[str, Any], message: str) -> None:
    path = _npz(tmp_path / "bad.npz", **arrays)  # np.savez pickles the object array; load_scores must refuse it
    with pytest.raises(ScoreInputError, match=message) as info:
        load_scores(path)
    assert info.value.file == str(path)


def test_load_refuses_what_is_not_an_npz(tmp_path: Path) -> None:
    with pytest.raises(ScoreInputError, match="nope.npz: scores file not found"):
        load_scores(tmp_path / "nope.npz")
    (tmp_path / "text.npz").write_text("not numpy")
    with pytest.raises(ScoreInputError, match="text.npz: not a numpy archive"):
        load_scores(tmp_path / "text.npz")
    np.save(tmp_path / "one.npy", I2T)
    with pytest.raises(ScoreInputError, match="one.npy: a single .npy array, not an .npz archive"):
        load_scores(tmp_path / "one.npy")


# --------------------------------------------------------------------------------------
# Annotation files
# --------------------------------------------------------------------------------------
def _karpathy(folder: Path, id_key: str = "cocoid") -> Path:
    """Karpathy-schema file: images 101, 202, 303 in 'test' (captions 11..32 as above), plus 404 in
    'train' and 505 in 'restval' that the score file never names."""
    images = [{"filepath": "val2014", "filename": f"{image_id}.jpg", "split": split, id_key: image_id,
               "sentids": [10 * k + 1, 10 * k + 2],
               "sentences": [{"sentid": 10 * k + j, "raw": f"caption {j} of {image_id}", "imgid": k}
                             for j in (1, 2)]}
              for k, (image_id, split) in enumerate([(101, "test"), (202, "test"), (303, "test"),
                                                     (404, "train"), (505, "restval")], start=1)]
    # the ids of image k are 10k+1 and 10k+2: 11, 12, 21, 22, 31, 32 for the test images
    path = folder / ("dataset_coco.json" if id_key == "cocoid" else "dataset_flickr30k.json")
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


def _coco(folder: Path) -> Path:
    """Official COCO captions: the same captions as annotation ids, plus image 404 not scored."""
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (101, 202, 303, 404)]
    annotations = [{"id": 10 * k + j, "image_id": image_id, "caption": f"caption {j} of {image_id}"}
                   for k, image_id in enumerate((101, 202, 303, 404), start=1) for j in (1, 2)]
    path = folder / "captions_val2014.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


HAND_SCORES = {"txt_r1": 200 / 3, "txt_r5": 100.0, "txt_r10": 100.0, "img_r1": 50.0, "img_r5": 100.0,
               "img_r10": 100.0, "r_mean": (200 / 3 + 450) / 6}  # as test_recall_default_ks_by_hand


@pytest.mark.parametrize("schema", ["karpathy", "flickr", "coco"])
def test_score_retrieval_against_each_schema(tmp_path: Path, schema: str) -> None:
    if schema == "coco":
        annotations = _coco(tmp_path)
    else:
        annotations = _karpathy(tmp_path, "imgid" if schema == "flickr" else "cocoid")
    scores = save_scores(tmp_path / "scores.npz", I2T, T2I, IMAGE_IDS, CAPTION_IDS)
    assert load_retrieval_annotations(annotations).schema == ("coco" if schema == "coco" else "karpathy")
    assert score_retrieval(annotations, scores) == pytest.approx(HAND_SCORES)


def test_score_file_order_does_not_matter(tmp_path: Path) -> None:
    annotations = _karpathy(tmp_path)
    rows, cols = [2, 0, 1], [5, 3, 0, 4, 1, 2]
    scores = save_scores(tmp_path / "permuted.npz", I2T[rows][:, cols], T2I[cols][:, rows],
                         [IMAGE_IDS[r] for r in rows], [CAPTION_IDS[c] for c in cols])
    assert score_retrieval(annotations, scores) == score_retrieval(
        annotations, RetrievalScores.checked(I2T, T2I, IMAGE_IDS, CAPTION_IDS))


@pytest.mark.parametrize(("image_ids", "caption_ids", "message"), [
    ([101, 999, 303], CAPTION_IDS,
     r"scores.npz, image_ids\[1\]: image id 999 is not in .*dataset_coco.json \(1 of 3 image ids are not: 999\)"),
    (IMAGE_IDS, [11, 12, 21, 77, 31, 78],
     (r"scores.npz, caption_ids\[3\]: caption id 77 is not in .*dataset_coco.json "
      r"\(2 of 6 caption ids are not: 77, 78\)")),
    # caption 41 belongs to train image 404, which the score file does not hold
    (IMAGE_IDS, [11, 12, 21, 41, 31, 32],
     (r"caption_ids\[3\]: caption id 41 describes image 404 \(images\[3\] \(cocoid=404\) of .*\), which is not "
      r"among the score file's image_ids")),
    (IMAGE_IDS, [11, 12, 21, 22, 31, 31],
     r"scores.npz, caption_ids\[5\]: id 31 appears twice \(first at caption_ids\[4\]\); expected unique caption_ids"),
])
def test_ids_that_do_not_match_the_annotations(tmp_path: Path, image_ids: list[int], caption_ids: list[int],
                                               message: str) -> None:
    annotations = _karpathy(tmp_path)
    path = _npz(tmp_path / "scores.npz", i2t=I2T[:, :len(caption_ids)], t2i=T2I[:len(caption_ids)],
                image_ids=np.array(image_ids), caption_ids=np.array(caption_ids))
    with pytest.raises(ScoreInputError, match=message):
        score_retrieval(annotations, path)


def test_an_image_without_scored_captions_is_an_error(tmp_path: Path) -> None:
    annotations = _karpathy(tmp_path)
    scores = RetrievalScores.checked(I2T[:, [0, 1, 4, 5]], T2I[[0, 1, 4, 5]], IMAGE_IDS, [11, 12, 31, 32])
    with pytest.raises(ScoreInputError, match=r"image_ids\[1\]: image id 202 has none of its captions among "
                                              r"caption_ids \(1 of 3 images have none\)"):
        score_retrieval(annotations, scores)


def test_annotation_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"info": {}, "licenses": []}))
    with pytest.raises(ScoreInputError, match=r"odd.json: no 'annotations' or 'images' list at the top level "
                                              r"\(found keys \['info', 'licenses'\]\)"):
        load_retrieval_annotations(path)
    path.write_text(json.dumps({"images": [{"cocoid": 1, "sentences": [{"raw": "a cat"}]}]}))
    with pytest.raises(ScoreInputError, match=r"odd.json, images\[0\] \(cocoid=1\), sentences\[0\]: missing key "
                                              r"'sentid'"):
        load_retrieval_annotations(path)
    path.write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"id": 5, "image_id": 2, "caption": "x"}]}))
    with pytest.raises(ScoreInputError, match=r"annotations\[0\] \(id=5\): image_id 2 is not in 'images'"):
        load_retrieval_annotations(path)


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------
def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_the_recalls_as_its_last_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    annotations = _karpathy(tmp_path)
    scores = save_scores(tmp_path / "scores.npz", I2T, T2I, IMAGE_IDS, CAPTION_IDS)
    out_file = tmp_path / "out" / "recalls.json"
    code, out, err = _run(["score", "retrieval", "--annotations", str(annotations), "--scores", str(scores),
                           "--output", str(out_file)], capsys)
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    result = json.loads(last)
    assert list(result) == KEYS and result == pytest.approx(HAND_SCORES)
    assert json.loads(out_file.read_text()) == result
    assert "3 images x 6 captions" in err and "karpathy schema" in err


def test_cli_bad_ids_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    annotations = _coco(tmp_path)
    scores = save_scores(tmp_path / "scores.npz", I2T, T2I, [101, 202, 999], CAPTION_IDS)
    code, out, err = _run(["score", "retrieval", "--annotations", str(annotations), "--scores", str(scores)], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("fusionzoo score: error: ") and "image_ids[2]: image id 999 is not in" in err


def test_cli_help_explains_files_and_prefixes(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["score"], capsys)
    assert code == 2 and "retrieval" in err
    with pytest.raises(SystemExit) as info:
        main(["score", "retrieval", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for words in ("dataset_coco.json", "cocoid", "imgid", "sentid", "annotations[].id", "i2t", "t2i",
                  "image_ids", "caption_ids", "image -> text", "text -> image", "Ties count against the query"):
        assert words in text, words
