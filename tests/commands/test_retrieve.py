"""``fusionzoo retrieve``: ranked results that equal the model's own scores, and an index that is reused or rebuilt.

A tiny random retrieval model is saved once; each test searches its own folder of small
solid-colour PNGs through ``fusionzoo.cli.main`` (the code path of the ``fusionzoo``
command) and checks the output against an independent computation with the model's
public API (``embed_images``, ``embed_texts``, ``match``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from fusionzoo.cli import main
from fusionzoo.factory import create_model
from fusionzoo.model import FusionModel, load_model

COLOURS = [("red", (40, 30)), ("blue", (20, 50)), ("green", (64, 64)), ("yellow", (33, 17)),
           ("white", (12, 12)), ("purple", (50, 25))]
QUERY = "a dog on a beach"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run's output_dir whose final/ holds a tiny random retrieval model."""
    torch.manual_seed(0)
    model = create_model("retrieval", "early_concat", vision="tiny", text="tiny", pretrained=False)
    run = tmp_path_factory.mktemp("retrieve-run")
    model.save_pretrained(run / "final")
    return run


@pytest.fixture(scope="module")
def model(run_dir: Path) -> FusionModel:
    return load_model(run_dir / "final")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default index location inside the test's folder (never the user's ~/.cache)."""
    monkeypatch.setenv("FUSIONZOO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Six PNGs of different colours and sizes, two of them in a subfolder."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i, (colour, size) in enumerate(COLOURS):
        Image.new("RGB", size, colour).save(root / ("sub" if i % 3 == 1 else "") / f"{colour}.png")
    return root


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["retrieve", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _json_results(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _reference(model: FusionModel, folder: Path, query: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Every image of ``folder`` (sorted), with its ITC cosine (I,) and ITM probability (I,) for ``query``."""
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    pil = [Image.open(p).convert("RGB") for p in paths]
    itc = (model.embed_images(pil) @ model.embed_texts([query]).T)[:, 0]  # (I,)
    itm = model.match(pil, [query] * len(pil))  # (I,)
    return paths, itc, itm


def test_ranked_output_equals_the_models_scores(run_dir: Path, model: FusionModel, images: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    paths, itc, itm = _reference(model, images, QUERY)
    shortlist = torch.argsort(itc, descending=True)[:4].tolist()  # --rerank-k 4
    expected = sorted(shortlist, key=lambda i: -float(itm[i]))[:3]  # --top 3

    code, out, err = _run(capsys, str(run_dir), "--images", str(images), "--query", QUERY, "--top", "3",
                          "--rerank-k", "4")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:2] == [f"query: {QUERY}", "rank  itm     itc      path"]
    rows = [line.split(maxsplit=3) for line in lines[2:]]
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    shown = [r[3] for r in rows]
    assert len(set(shown)) == 3 and all(Path(p).is_file() for p in shown)
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert shown == [paths[i] for i in expected]
    for row, i in zip(rows, expected):
        assert abs(float(row[1]) - float(itm[i])) <= 1e-4 + 5e-5  # printed with 4 decimals
        assert abs(float(row[2]) - float(itc[i])) <= 1e-4 + 5e-5

    code, out, _ = _run(capsys, str(run_dir / "final"), "--images", str(images), "--query", QUERY, "--top", "3",
                        "--rerank-k", "4", "--json")
    assert code == 0
    [record] = _json_results(out)
    assert record["query"] == QUERY
    assert [r["path"] for r in record["results"]] == [paths[i] for i in expected]
    for result, i in zip(record["results"], expected):
        assert result["itm"] == pytest.approx(float(itm[i]), abs=1e-4)
        assert result["itc"] == pytest.approx(float(itc[i]), abs=1e-4)


def test_index_is_reused_while_nothing_changes_and_rebuilt_after(run_dir: Path, images: Path, _cache: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(run_dir), "--images", str(images), "--query", QUERY, "--top", "6", "--json"]
    code, first, err = _run(capsys, *argv)
    assert code == 0 and "index built" in err
    [index_file] = list(_cache.rglob("index.pt"))
    built = index_file.stat().st_mtime_ns

    code, second, err = _run(capsys, *argv)
    assert code == 0 and "index reused" in err and "index built" not in err
    assert second == first
    assert index_file.stat().st_mtime_ns == built

    touched = images / "red.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    code, third, err = _run(capsys, *argv)
    assert code == 0 and "index built (the images or the model changed)" in err
    assert third == first  # same pixels, same scores
    assert list(_cache.rglob("index.pt")) == [index_file]  # replaced, not left beside a new one

    Image.new("RGB", (30, 30), "orange").save(images / "sub" / "orange.png")
    code, fourth, err = _run(capsys, *argv[:-3], "--top", "7", "--json")
    assert code == 0 and "index built" in err and "7 images" in err
    assert str(images / "sub" / "orange.png") in {r["path"] for r in _json_results(fourth)[0]["results"]}


def test_index_option_keeps_the_index_in_that_file(run_dir: Path, images: Path, tmp_path: Path, _cache: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    index = tmp_path / "elsewhere" / "photos.pt"
    argv = [str(run_dir), "--images", str(images), "--query", QUERY, "--index", str(index)]
    assert _run(capsys, *argv)[0] == 0
    assert index.is_file() and not _cache.exists()
    code, _, err = _run(capsys, *argv)
    assert code == 0 and f"index reused: 6 images of {images}" in err


def test_rerank_k_0_ranks_by_itc(run_dir: Path, model: FusionModel, images: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    paths, itc, _ = _reference(model, images, QUERY)
    code, out, err = _run(capsys, str(run_dir), "--images", str(images), "--query", QUERY, "--top", "6",
                          "--rerank-k", "0", "--json")
    assert code == 0, err
    results = _json_results(out)[0]["results"]
    assert [r["path"] for r in results] == [paths[i] for i in torch.argsort(itc, descending=True).tolist()]
    assert all(r["itm"] is None for r in results)
    assert [r["itc"] for r in results] == pytest.approx(sorted(itc.tolist(), reverse=True), abs=1e-4)


def test_text_file_gives_one_result_per_query(run_dir: Path, images: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    queries = tmp_path / "queries.txt"
    queries.write_text("a red square\n\n  a blue one  \n")
    code, out, err = _run(capsys, str(run_dir), "--images", str(images), "--text-file", str(queries), "--json",
                          "--top", "2")
    assert code == 0, err
    records = _json_results(out)
    assert [r["query"] for r in records] == ["a red square", "a blue one"]
    assert all(len(r["results"]) == 2 for r in records)


def test_corrupt_image_is_skipped_with_a_warning(run_dir: Path, images: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "sub" / "empty.jpg").write_bytes(b"")
    code, out, err = _run(capsys, str(run_dir), "--images", str(images), "--query", QUERY, "--top", "10",
                          "--json")
    assert code == 0, err
    assert f"warning: skipped {images / 'broken.png'}" in err
    assert f"warning: skipped {images / 'sub' / 'empty.jpg'}" in err
    assert "6 images" in err and "2 skipped" in err
    shown = {r["path"] for r in _json_results(out)[0]["results"]}
    assert len(shown) == 6 and str(images / "broken.png") not in shown


def _one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusionzoo retrieve: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0]


def test_bad_input_is_one_line_naming_the_path(run_dir: Path, images: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-folder"
    _one_line_error(*_run(capsys, str(run_dir), "--images", str(missing), "--query", QUERY)[::2], str(missing))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    _one_line_error(*_run(capsys, str(run_dir), "--images", str(images), "--text-file", str(empty))[::2],
                    str(empty), "no queries")
    no_images = tmp_path / "notes"
    no_images.mkdir()
    (no_images / "readme.txt").write_text("no pictures here")
    _one_line_error(*_run(capsys, str(run_dir), "--images", str(no_images), "--query", QUERY)[::2],
                    str(no_images), "no image files")
    _one_line_error(*_run(capsys, str(tmp_path), "--images", str(images), "--query", QUERY)[::2],
                    str(tmp_path), "config.json")


def test_a_model_without_alignment_is_refused(images: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    vqa = create_model("vqa", "early_concat", vision="tiny", text="tiny", pretrained=False, answers=["yes", "no"])
    vqa.save_pretrained(tmp_path / "vqa")
    _one_line_error(*_run(capsys, str(tmp_path / "vqa"), "--images", str(images), "--query", QUERY)[::2],
                    "task=retrieval")


def test_help_describes_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["retrieve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--rerank-k" in out and "examples:" in out and "fusionzoo retrieve runs/retrieval" in out
