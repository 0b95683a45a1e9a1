"""Pretraining-scale image-text sources: image-text JSONL, webdataset shards, ``datasets`` folders.

Every source is written here, in a temporary folder, from small synthetic PNGs (nothing from a
hub); the tests read it back through the registered loaders and check that the samples equal
what was written, how shards are named (braces, globs, weights), how a stream is split over
processes and DataLoader workers, shuffled and mixed, and how bad entries are reported.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fusionzoo.registry import DATASETS
from fusionzoo.tasks import get_task
from fusionzoo.data.captions import CaptionData
from fusionzoo.data.checks import DataError
from fusionzoo.data.streaming import ImageTextStream, StreamData
from fusionzoo.data.webdataset_shards import expand_braces, parse_sources, resolve_shards
from fusionzoo.training.config import ConfigError, load_config

from image_text_fixtures import (
    caption,
    picture,
    pixels,
    png_bytes,
    sample_members,
    write_image_text_folder,
    write_jsonl,
    write_shards,
    write_tar,
)


def as_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8: the exact pixels, as a transform would hand them on."""
    return torch.from_numpy(pixels(image).copy()).permute(2, 0, 1)


def number(text: str) -> int:
    """The sample number a fixture caption names (``picture number 12 caption 0`` -> 12)."""
    return int(text.split()[2])


# --------------------------------------------------------------------------------------
# Image-text JSONL
# --------------------------------------------------------------------------------------
def test_jsonl_splits_captions_and_pixels_equal_what_was_written(tmp_path: Path) -> None:
    numbers = write_image_text_folder(tmp_path, {"train": 5, "val": 3, "test": 2})
    data = DATASETS.get("image-text-jsonl")(tmp_path)
    assert isinstance(data, CaptionData) and data.split_names == ["train", "val", "test"]
    assert {split: len(data[split]) for split in data.split_names} == {"train": 5, "val": 3, "test": 2}
    loaded = data.with_image_transform(as_tensor)
    for split, wanted in numbers.items():
        pairs = loaded.pairs(split)
        assert [number(row["caption"]) for row in pairs.with_format(None)] == wanted
        for item in pairs:
            n = number(item["caption"])
            assert np.array_equal(item["pixel_values"].permute(1, 2, 0).numpy(), pixels(picture(n)))
    assert data.references("val") == {row["image_id"]: [caption(n)] for row, n in
                                      zip(data["val"].with_format(None), numbers["val"])}


def test_json_list_and_caption_lists_group_by_image_with_one_id_across_splits(tmp_path: Path) -> None:
    for n in range(3):
        picture(n).save(tmp_path / f"{n}.png")
    # ALBEF's layout: a JSON list, one entry per caption, an image repeated; "caption" may be a list
    (tmp_path / "cc_train.json").write_text(json.dumps([
        {"image": "0.png", "caption": "first of zero"},
        {"image": "1.png", "caption": ["one a", "one b"], "image_id": "ignored"},
        {"image": "0.png", "caption": "second of zero"},
    ]))
    write_jsonl(tmp_path / "more.jsonl", [{"image": "2.png", "captions": ["two a", " two b "]}])
    write_jsonl(tmp_path / "val.jsonl", [{"image": "0.png", "caption": "zero in val"}])
    data = DATASETS.get("image-text-jsonl")(
        tmp_path, files={"train": ["cc_train.json", "more.jsonl"], "val": "val.jsonl"})
    rows = data["train"].with_format(None).to_list()
    assert [(Path(r["image_path"]).name, r["captions"]) for r in rows] == [
        ("0.png", ["first of zero", "second of zero"]), ("1.png", ["one a", "one b"]), ("2.png", ["two a", "two b"])]
    assert len(data.pairs("train")) == 6
    assert len({cid for r in rows for cid in r["caption_ids"]}) == 6
    assert data["val"][0]["image_id"] == rows[0]["image_id"]  # the same image, the same id

    lone = DATASETS.get("image-text-jsonl")(files=tmp_path / "cc_train.json")  # one file: a train split
    assert lone.split_names == ["train"] and len(lone.pairs("train")) == 4


def test_jsonl_bad_lines_name_file_line_key_and_expectation(tmp_path: Path) -> None:
    picture(0).save(tmp_path / "a.png")
    good = {"image": "a.png", "caption": "ok"}
    cases = [
        ({"image": "a.png"}, r"train\.jsonl, line 2: missing key 'caption' \(or 'captions'\); expected 'caption'"),
        ({"image": 7, "caption": "x"}, r"train\.jsonl, line 2: key 'image' is int 7; expected 'image' holding a str"),
        ({"image": "a.png", "captions": ["x", 3]}, r"line 2: captions\[1\] is int 3"),
        ({"image": "a.png", "caption": "  "}, r"line 2: empty caption in 'caption'"),
        ({"image": "../a.png", "caption": "x"}, r"line 2: image path '\.\./a\.png' escapes the image root"),
        ("not json", r"line 2: not valid JSON"),
    ]
    for bad, message in cases:
        write_jsonl(tmp_path / "train.jsonl", [good, bad, good])
        with pytest.raises(DataError, match=message):
            DATASETS.get("image-text-jsonl")(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", [good, {"image": "a.png"}, {"image": "gone.png", "caption": "x"}])
    with pytest.warns(UserWarning, match=r"skipped 1 bad entries .*line 2: missing key 'caption'"):
        data = DATASETS.get("image-text-jsonl")(tmp_path, skip_bad=True)
    assert len(data["train"]) == 1 and data.reports["train"].bad_entries == 1
    assert data.reports["train"].missing_images == 1
    assert data.reports["train"].missing_files == [str(tmp_path / "gone.png")]
    (tmp_path / "train.json").write_text(json.dumps({"image": "a.png"}))
    with pytest.raises(DataError, match=r"train\.json, top level: a JSON dict at the top level; expected a JSON list"):
        DATASETS.get("image-text-jsonl")(files=tmp_path / "train.json")


def test_jsonl_serves_every_task_that_reads_image_text_pairs(tmp_path: Path) -> None:
    write_image_text_folder(tmp_path, {"train": 4, "val": 2})
    for task in ("captioning", "retrieval"):
        config = load_config(None, [f"task={task}", "data=image-text-jsonl", f"data_dir={tmp_path}"])
        data = get_task(task).load_data(config)
        assert len(get_task(task).train_rows(data, "train")) == 4
    config = load_config(None, ["task=classification", "data=caption-match", f"data_dir={tmp_path}",
                                "data_kwargs.source=image-text-jsonl"])
    match = get_task("classification").load_data(config)
    assert len(match["train"]) == 8 and match.label_names == ["mismatch", "match"]


# --------------------------------------------------------------------------------------
# webdataset: naming shards
# --------------------------------------------------------------------------------------
def test_brace_lists_and_globs_expand_in_order(tmp_path: Path) -> None:
    assert expand_braces("cc3m-{0000..0003}.tar") == [f"cc3m-{i:04d}.tar" for i in range(4)]
    assert expand_braces("{8..10}.tar") == ["8.tar", "9.tar", "10.tar"]
    assert expand_braces("{a,b{1..2}}/x-{0,1}.tar") == ["a/x-0.tar", "a/x-1.tar", "b1/x-0.tar", "b1/x-1.tar",
                                                        "b2/x-0.tar", "b2/x-1.tar"]
    with pytest.raises(DataError, match="unbalanced"):
        expand_braces("x-{0..3.tar")

    write_shards(tmp_path / "a", 3, 1)
    write_shards(tmp_path / "b", 2, 1, stem="part-{}.tar")
    assert [Path(p).name for p in resolve_shards(["a/{0000..0002}.tar"], tmp_path)] == [
        "0000.tar", "0001.tar", "0002.tar"]
    assert [Path(p).relative_to(tmp_path).as_posix() for p in resolve_shards(["b/*.tar", "a/0001.tar"], tmp_path)] \
        == ["b/part-0.tar", "b/part-1.tar", "a/0001.tar"]
    with pytest.raises(DataError, match=r"a/0003\.tar, from 'a/\{0000\.\.0003\}\.tar': shard not found"):
        resolve_shards(["a/{0000..0003}.tar"], tmp_path)
    with pytest.raises(DataError, match=r"no files match 'c/\*\.tar'"):
        resolve_shards(["c/*.tar"], tmp_path)


def test_source_syntax_commas_weights_and_mappings() -> None:
    one = parse_sources("a/{0,1}.tar,b/{0..1}.tar")
    assert len(one) == 1 and one[0].patterns == ("a/{0,1}.tar", "b/{0..1}.tar") and one[0].weight is None
    mixed = parse_sources("a/{0..3}.tar::0.7,b/{0..1}.tar::0.3")
    assert [(s.patterns, s.weight) for s in mixed] == [(("a/{0..3}.tar",), 0.7), (("b/{0..1}.tar",), 0.3)]
    listed = parse_sources([{"shards": "a/{0..3}.tar", "weight": 0.7},
                            {"shards": ["b/0.tar", "b/1.tar"], "weight": 0.3}])
    assert [(s.patterns, s.weight) for s in listed] == [(("a/{0..3}.tar",), 0.7), (("b/0.tar", "b/1.tar"), 0.3)]
    for bad, message in [("a.tar::0.7,b.tar", "some sources have a '::weight' and some do not"),
                         ("a.tar::heavy", "weight 'heavy' of 'a.tar' is not a number"),
                         ("a.tar::0", "is not positive"), ([{"tars": "a.tar"}], r"data_files\[0\] has keys")]:
        with pytest.raises(DataError, match=message):
            parse_sources(bad)


# --------------------------------------------------------------------------------------
# webdataset: reading
# --------------------------------------------------------------------------------------
def test_shards_read_back_exactly_what_was_written(tmp_path: Path) -> None:
    written = write_shards(tmp_path / "shards", 4, 5)
    data = DATASETS.get("webdataset")(tmp_path, files="shards/{0000..0003}.tar")
    assert isinstance(data, StreamData) and data.split_names == ["train"] and data["train"].num_shards == 4
    items = list(data["train"])
    assert [item["captions"] for item in items] == [[c] for c in written]  # shard order, member order
    assert [item["key"] for item in items] == [f"{n:06d}" for n in range(20)]
    for item in items:
        assert np.array_equal(pixels(item["image"]), pixels(picture(number(item["captions"][0]))))
    assert len({item["image_id"] for item in items}) == 20
    pairs = list(data.with_image_transform(as_tensor).pairs("train"))
    assert [p["caption"] for p in pairs] == list(written) and pairs[3]["pixel_values"].shape == (3, 9, 11)
    assert data.references("train") == {item["image_id"]: item["captions"] for item in items}


def test_members_json_captions_other_image_types_and_discovery(tmp_path: Path) -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (10, 7), (200, 10, 10)).save(jpeg, "JPEG")
    webp = io.BytesIO()
    picture(3).save(webp, "WEBP", lossless=True)
    write_tar(tmp_path / "train" / "0000.tar", [
        *sample_members(0, how="json"),  # "captions": two captions
        *sample_members(1, how="both"),  # .txt wins over .json
        ("sub/000002.jpg", jpeg.getvalue()), ("sub/000002.txt", b"a jpeg"), ("sub/000002.cls", b"3"),
        ("000003.webp", webp.getvalue()), ("000003.txt", b"a webp"),
    ])
    write_tar(tmp_path / "val" / "0000.tar", sample_members(9))
    data = DATASETS.get("webdataset")(tmp_path)  # found in train/ and val/
    assert data.split_names == ["train", "val"]
    items = list(data["train"])
    assert [i["captions"] for i in items] == [[caption(0, 0), caption(0, 1)], [caption(1)], ["a jpeg"], ["a webp"]]
    assert items[2]["key"] == "sub/000002" and items[2]["image"].size == (10, 7)
    assert np.array_equal(pixels(items[3]["image"]), pixels(picture(3)))
    assert [p["caption"] for p in data.pairs("train")][:2] == [caption(0, 0), caption(0, 1)]


def test_corrupt_and_captionless_members_are_skipped_counted_and_named(tmp_path: Path) -> None:
    members = [*sample_members(0), ("000001.png", b"not an image"), ("000001.txt", b"broken"),
               ("000002.png", png_bytes(picture(2))),  # no caption
               ("000003.txt", b"no image"), *sample_members(4), *sample_members(5)]
    shard = write_tar(tmp_path / "s.tar", members)
    stream = DATASETS.get("webdataset")(files=str(shard), max_bad_fraction=0.5)["train"]
    with pytest.warns(UserWarning, match=r"skipped 3 bad samples \(3 of 6 read so far\); first: .*s\.tar, 000002: no "
                                         r"caption.*s\.tar, 000003: no image member"):
        items = list(stream)
    assert [number(i["captions"][0]) for i in items] == [0, 4, 5]
    stats = stream.stats
    assert (stats.samples, stats.bad_members, stats.bad_images) == (6, 2, 1)
    assert "s.tar, 000001: cannot decode image" in stats.image_examples[0]

    strict = DATASETS.get("webdataset")(files=str(shard), max_bad_fraction=0.2)["train"]
    with pytest.raises(DataError, match=r"3 of 6 samples read from split 'train' are bad, more than "
                                        r"max_bad_fraction=0\.2; first: .*s\.tar, 000002"):
        with pytest.warns(UserWarning):
            list(strict)


def test_unreadable_shard_is_an_error_naming_it_or_skipped_with_skip_bad(tmp_path: Path) -> None:
    good = write_tar(tmp_path / "0000.tar", sample_members(0) + sample_members(1))
    truncated = tmp_path / "0001.tar"
    truncated.write_bytes(write_tar(tmp_path / "full.tar", sample_members(2) + sample_members(3)).read_bytes()[:1300])
    (tmp_path / "full.tar").unlink()
    with pytest.raises(DataError, match=r"0001\.tar: cannot read the tar shard .*skip_bad=true"):
        list(DATASETS.get("webdataset")(tmp_path)["train"])
    stream = DATASETS.get("webdataset")(tmp_path, skip_bad=True, max_bad_fraction=0.5)["train"]
    with pytest.warns(UserWarning, match=r"0001\.tar, .*shard unreadable"):
        items = list(stream)
    assert [number(i["captions"][0]) for i in items][:2] == [0, 1] and stream.stats.bad_members == 1
    assert good.exists()


# --------------------------------------------------------------------------------------
# webdataset: splitting, shuffling, mixing
# --------------------------------------------------------------------------------------
def _read_as_processes(stream: ImageTextStream, processes: int, workers: int) -> list[list[int]]:
    """Sample numbers each simulated process reads through a DataLoader with ``workers`` workers."""
    out = []
    for rank in range(processes):
        loader = DataLoader(stream.for_process(rank, processes).with_transform(as_tensor), batch_size=None,
                            num_workers=workers)
        out.append([number(item["captions"][0]) for item in loader])
    return out


@pytest.mark.parametrize("shards, per_shard", [(8, 3), (3, 5)])  # more shards than readers, and fewer
def test_two_processes_by_two_workers_read_every_sample_once_per_epoch(tmp_path: Path, shards: int,
                                                                       per_shard: int) -> None:
    write_shards(tmp_path, shards, per_shard)
    stream = DATASETS.get("webdataset")(tmp_path)["train"].with_options(shuffle=True, shuffle_buffer=4, seed=1)
    total = shards * per_shard
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        per_process = _read_as_processes(stream, 2, 2)
        everything = [n for part in per_process for n in part]
        assert sorted(everything) == list(range(total)), f"epoch {epoch}"
        assert all(part for part in per_process)
    stream.set_epoch(0)
    assert _read_as_processes(stream, 2, 2) == _read_as_processes(stream, 2, 2)  # deterministic


def test_shuffling_is_determined_by_seed_and_epoch(tmp_path: Path) -> None:
    write_shards(tmp_path, 4, 6)
    base = DATASETS.get("webdataset")(tmp_path, shuffle_buffer=8)["train"]

    def order(seed: int, epoch: int) -> list[int]:
        stream = base.with_options(shuffle=True, seed=seed)
        stream.set_epoch(epoch)
        return [number(i["captions"][0]) for i in stream]

    first = order(0, 0)
    assert sorted(first) == list(range(24)) and first != list(range(24))
    assert order(0, 0) == first
    assert order(1, 0) != first and order(0, 1) != first
    assert [number(i["captions"][0]) for i in base] == list(range(24))  # no shuffling unless asked


def test_mixing_weights_set_the_proportions_deterministically(tmp_path: Path) -> None:
    write_shards(tmp_path / "a", 2, 5)
    write_shards(tmp_path / "b", 1, 5, start=100)
    files = "a/{0000..0001}.tar::0.7,b/0000.tar::0.3"

    def draw(spec: Any, seed: int, count: int = 2000) -> list[int]:
        stream = DATASETS.get("webdataset")(tmp_path, files=spec)["train"]
        stream = stream.with_options(repeat=True, shuffle=True, shuffle_buffer=16, seed=seed)
        numbers = []
        for item in stream:
            numbers.append(number(item["captions"][0]))
            if len(numbers) == count:
                return numbers
        raise AssertionError("a repeating stream ended")

    numbers = draw(files, seed=0)
    share = sum(n < 100 for n in numbers) / len(numbers)
    assert abs(share - 0.7) < 0.04, share
    assert draw(files, seed=0) == numbers and draw(files, seed=1) != numbers
    counts = Counter(numbers)
    assert set(counts) == set(range(10)) | set(range(100, 105))  # every sample of both sources comes back
    listed = [{"shards": "a/{0000..0001}.tar", "weight": 0.7}, {"shards": "b/0000.tar", "weight": 0.3}]
    assert draw(listed, seed=0, count=300) == numbers[:300]  # the list form is the same sources

    once = DATASETS.get("webdataset")(tmp_path, files=files)["train"]
    assert sorted(number(i["captions"][0]) for i in once) == sorted(set(numbers))  # one pass: each sample once


# --------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------
@pytest.fixture
def hf_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path


def _saved_dataset(root: Path) -> Path:
    import datasets

    def split(numbers: range) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"image": [picture(n) for n in numbers], "sentences": [[caption(n, 0), caption(n, 1)] for n in numbers]},
            features=datasets.Features({"image": datasets.Image(), "sentences": [datasets.Value("string")]}))

    folder = root / "saved"
    datasets.DatasetDict({"train": split(range(6)), "validation": split(range(6, 9))}).save_to_disk(str(folder))
    return folder


def test_datasets_folder_mapped_gives_caption_data_with_the_stored_images(hf_offline: Path) -> None:
    folder = _saved_dataset(hf_offline)
    data = DATASETS.get("hf-datasets")(folder)
    assert isinstance(data, CaptionData) and data.split_names == ["train", "validation"]
    assert len(data["train"]) == 6 and len(data.pairs("train")) == 12
    loaded = data.with_image_transform(as_tensor)
    for item in loaded.pairs("validation"):
        assert np.array_equal(item["pixel_values"].permute(1, 2, 0).numpy(), pixels(picture(number(item["caption"]))))
    pixels_by_worker = [b["pixel_values"].shape for b in DataLoader(loaded["train"], batch_size=None, num_workers=2)]
    assert len(pixels_by_worker) == 6  # the stored images open in DataLoader workers too
    match = DATASETS.get("caption-match")(folder, source="hf-datasets", splits=["train"]).with_image_transform(
        as_tensor)
    assert len(match["train"]) == 24 and match["train"][0]["pixel_values"].shape[0] == 3


def test_images_stored_in_a_dataset_are_cached_by_their_bytes(hf_offline: Path) -> None:
    """Captioning on a ``save_to_disk`` folder whose images are inside the table: the first run extracts
    their tokens into the feature cache, keyed by the stored bytes; a second run extracts nothing."""
    import safetensors.torch

    from fusionzoo.training.trainer import train

    folder = _saved_dataset(hf_offline)
    data = DATASETS.get("hf-datasets")(folder)
    stored = data.images.read_bytes("hf://train/2")
    assert Image.open(io.BytesIO(stored)).convert("RGB").tobytes() == picture(2).tobytes()
    with pytest.raises(DataError, match="no stored image 'hf://train/99'"):
        data.images.read_bytes("hf://train/99")

    def run(name: str, *extra: str) -> dict[str, Any]:
        train(load_config(None, ["task=captioning", "fusion=early_concat", "data=hf-datasets", f"data_dir={folder}",
                                 "vision=tiny", "text=tiny", "fusion_kwargs.dim=16", "batch_size=4", "max_steps=3",
                                 "max_eval_samples=0", "log_with=none", "max_text_len=10", "seed=0",
                                 f"cache_dir={hf_offline / 'cache'}", f"output_dir={hf_offline / name}", *extra]))
        return json.loads((hf_offline / name / "final" / "run.json").read_text())

    first, second = run("a"), run("b")
    assert first["feature_cache"]["misses"] >= 1
    image_entry = next(e for e in first["feature_cache"]["entries"] if e["name"].startswith("image-"))
    assert second["feature_cache"]["misses"] == 0 and second["feature_cache"]["extraction_seconds"] == 0
    assert any(e["key"] == image_entry["key"] and e["hit"] for e in second["feature_cache"]["entries"])
    uncached = run("c", "feature_cache=false")
    assert "feature_cache" not in uncached
    weights = [safetensors.torch.load_file(str(hf_offline / n / "final" / "model.safetensors")) for n in "abc"]
    for key in weights[0]:  # cached runs agree; the live one differs only by the float16 rounding of the cache
        torch.testing.assert_close(weights[1][key], weights[0][key])
        torch.testing.assert_close(weights[2][key], weights[0][key], rtol=0.05, atol=0.02)


def test_datasets_folder_streamed_reads_every_row_once_over_processes_and_workers(hf_offline: Path) -> None:
    folder = _saved_dataset(hf_offline)
    data = DATASETS.get("hf-datasets")(folder, streaming=True)
    assert isinstance(data, StreamData)
    items = list(data["train"])
    assert [i["captions"] for i in items] == [[caption(n, 0), caption(n, 1)] for n in range(6)]
    assert all(np.array_equal(pixels(i["image"]), pixels(picture(n))) for i, n in zip(items, range(6)))
    per_process = _read_as_processes(data["train"].with_options(shuffle=True, seed=3), 2, 2)
    assert sorted(n for part in per_process for n in part) == list(range(6))


def test_datasets_parquet_files_with_path_images_and_named_columns(hf_offline: Path) -> None:
    import datasets

    for n in range(4):
        (hf_offline / "img").mkdir(exist_ok=True)
        picture(n).save(hf_offline / "img" / f"{n}.png")
    table = datasets.Dataset.from_dict({"file": [f"img/{n}.png" for n in range(4)],
                                        "alt_text": [caption(n) for n in range(4)], "other": list(range(4))})
    (hf_offline / "data").mkdir()
    table.to_parquet(str(hf_offline / "data" / "train-00000-of-00001.parquet"))
    data = DATASETS.get("hf-datasets")(hf_offline, image_column="file", caption_column="alt_text")
    assert data.images is None and [Path(p).name for p in data["train"]["image_path"]] == [f"{n}.png" for n in range(4)]
    first = data.with_image_transform(as_tensor).pairs("train")[2]
    assert np.array_equal(first["pixel_values"].permute(1, 2, 0).numpy(), pixels(picture(2)))
    streamed = DATASETS.get("hf-datasets")(hf_offline, image_column="file", caption_column="alt_text", streaming=True)
    assert [number(i["captions"][0]) for i in streamed["train"]] == [0, 1, 2, 3]
    with pytest.raises(DataError, match=r"no caption column among \['file', 'alt_text', 'other'\]"):
        DATASETS.get("hf-datasets")(hf_offline, image_column="file")
    with pytest.raises(DataError, match=r"no image column 'picture'; expected one of the columns"):
        DATASETS.get("hf-datasets")(hf_offline, image_column="picture", caption_column="alt_text")
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"


# --------------------------------------------------------------------------------------
# The run configuration reaches the loaders
# --------------------------------------------------------------------------------------
def test_data_files_and_data_kwargs_reach_the_loader(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards", 2, 2)
    config = load_config(None, ["task=captioning", "data=webdataset", f"data_dir={tmp_path}",
                                "data_files=shards/{0000..0001}.tar", "data_kwargs.shuffle_buffer=7"])
    data = get_task("captioning").load_data(config)
    assert isinstance(data, StreamData) and data["train"].options.shuffle_buffer == 7
    assert data["train"].num_shards == 2
    config = load_config(None, ["task=captioning", "data=webdataset", f"data_dir={tmp_path}",
                                "data_kwargs.shufle_buffer=7"])
    with pytest.raises(ConfigError, match=r"data_kwargs\.shufle_buffer': data='webdataset' has no option "
                                          r"'shufle_buffer'; it takes files, splits, shuffle_buffer"):
        get_task("captioning").load_data(config)
    config = load_config(None, ["task=vqa", "data=easy-vqa", "data_files=x.json"])
    with pytest.raises(ConfigError, match="data='easy-vqa' does not take data files"):
        get_task("vqa").load_data(config)
