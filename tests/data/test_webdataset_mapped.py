"""webdataset shards indexed into map-style splits (``data_kwargs.streaming=false``).

Each test writes small shards in a temporary folder (:mod:`image_text_fixtures`), loads them
with ``streaming=False`` and checks the rows, the images read back by seeking, and the errors.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusionzoo.cli import main
from fusionzoo.registry import DATASETS
from fusionzoo.data.captions import CaptionData
from fusionzoo.data.checks import DataError
from fusionzoo.data.webdataset_shards import ShardImages, load_webdataset, shard_reference
from fusionzoo.training.config import ConfigError, load_config
from fusionzoo.training.trainer import refuse_streamed, train

from image_text_fixtures import caption, picture, pixels, png_bytes, sample_members, write_shards, write_tar


def number(text: str) -> int:
    """The sample number a fixture caption names (``picture number 12 caption 0`` -> 12)."""
    return int(text.split()[2])


def member_bytes(shard: Path, name: str) -> bytes:
    with tarfile.open(shard) as tar:
        return tar.extractfile(name).read()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """``train/`` of 2 shards x 3 samples (one caption each), ``val/`` of 1 shard x 2 samples (two captions each)."""
    write_shards(tmp_path / "train", 2, 3)
    write_shards(tmp_path / "val", 1, 2, start=100, how="json")
    return tmp_path


# --------------------------------------------------------------------------------------
# Rows and images
# --------------------------------------------------------------------------------------
def test_indexed_splits_hold_what_was_written_and_images_read_back_by_seeking(folder: Path) -> None:
    data = load_webdataset(folder, streaming=False)
    assert isinstance(data, CaptionData) and data.split_names == ["train", "val"]
    train, val = data["train"].to_dict(), data["val"].to_dict()
    assert train["captions"] == [[caption(n)] for n in range(6)]
    assert val["captions"] == [[caption(n, 0), caption(n, 1)] for n in (100, 101)]
    assert train["image_id"] + val["image_id"] == list(range(8))  # in order of appearance over the splits
    assert train["caption_ids"] + val["caption_ids"] == [[0], [1], [2], [3], [4], [5], [6, 7], [8, 9]]
    shard = str(folder / "train" / "0001.tar")
    assert train["image_path"][3] == shard_reference(shard, "000003") == f"{shard}#000003"
    assert len(data.pairs("val")) == 4 and data.references("val") == {6: val["captions"][0], 7: val["captions"][1]}

    images = data.images
    assert isinstance(images, ShardImages)
    for reference, captions in zip(train["image_path"] + val["image_path"], train["captions"] + val["captions"]):
        assert np.array_equal(pixels(images(reference)), pixels(picture(number(captions[0]))))
    val_shard = folder / "val" / "0000.tar"
    assert images.read_bytes(f"{val_shard}#000101") == member_bytes(val_shard, "000101.png")

    copy = pickle.loads(pickle.dumps(images))  # what a DataLoader worker gets
    assert copy.read_bytes(train["image_path"][4]) == images.read_bytes(train["image_path"][4])
    assert np.array_equal(pixels(copy(train["image_path"][4])), pixels(picture(4)))
    with pytest.raises(DataError, match=r"no indexed image '.*0000\.tar#000099'; expected a '<shard>#<key>' "
                                        r"reference of the 3 indexed shards"):
        images.read_bytes(f"{folder / 'train' / '0000.tar'}#000099")

    to_tensor = lambda image: torch.from_numpy(pixels(image).copy()).permute(2, 0, 1)  # noqa: E731
    pairs = data.with_image_transform(to_tensor).pairs("val")
    assert pairs[3]["caption"] == caption(101, 1) and pairs[3]["pixel_values"].shape == (3, 7, 13)


def test_map_style_and_streamed_forms_give_the_same_image_caption_pairs(tmp_path: Path) -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (10, 7), (200, 10, 10)).save(jpeg, "JPEG")
    write_tar(tmp_path / "shards" / "0000.tar", [
        *sample_members(0, how="json"), *sample_members(1, how="both"),
        ("sub/000002.jpg", jpeg.getvalue()), ("sub/000002.txt", b"a jpeg"), ("sub/000002.cls", b"3"),
    ])
    write_shards(tmp_path / "shards", 1, 4, start=10, stem="0001.tar")
    files = "shards/{0000..0001}.tar"

    def key(image: Image.Image, text: str) -> tuple[bytes, tuple[int, int], str]:
        return image.tobytes(), image.size, text

    streamed = load_webdataset(tmp_path, files=files)
    expected = {key(item["image"], text) for item in streamed["train"] for text in item["captions"]}
    mapped = load_webdataset(tmp_path, files=files, streaming=False)
    found = {key(mapped.images(row["image_path"]), row["caption"]) for row in mapped.pairs("train")}
    assert found == expected and len(found) == len(mapped.pairs("train")) == 8


# --------------------------------------------------------------------------------------
# Bad samples and shards that cannot be indexed
# --------------------------------------------------------------------------------------
BAD = {
    "no image": ([("000001.txt", b"a caption without an image")], r"000001: no image member \(\.jpg, .*found \.txt"),
    "no caption": ([("000002.png", png_bytes(picture(2)))], r"000002: no caption \(a \.txt member"),
    "bad json": ([("000003.png", png_bytes(picture(3))), ("000003.json", b"{not json")],
                 r"000003: \.json member is not valid JSON"),
    "key twice": (sample_members(0), r"000000: key appears twice in the shard"),
}


@pytest.mark.parametrize("problem", list(BAD))
def test_a_bad_sample_is_an_error_naming_shard_key_and_expectation(tmp_path: Path, problem: str) -> None:
    members, message = BAD[problem]
    shard = write_tar(tmp_path / "0000.tar", [*sample_members(0), *sample_members(5), *members, *sample_members(6)])
    with pytest.raises(DataError, match=rf"0000\.tar, {message}.*; expected a sample of consecutive members "
                                        r"sharing a key.*skip_bad=true"):
        load_webdataset(files=str(shard), streaming=False)


def test_bad_samples_are_skipped_counted_and_named_with_skip_bad(tmp_path: Path) -> None:
    bad = [member for members, _ in BAD.values() for member in members]
    shard = write_tar(tmp_path / "0000.tar", [*sample_members(0), *sample_members(5), *bad, *sample_members(6)])
    with pytest.warns(UserWarning, match=r"split 'train' of .*0000\.tar: skipped 4 bad entries \(skip_bad=True\); "
                                         r"first: .*0000\.tar, 000001: no image member.*000000: key appears twice"):
        data = load_webdataset(files=str(shard), streaming=False, skip_bad=True)
    assert [number(c[0]) for c in data["train"]["captions"]] == [0, 5, 6]
    assert data.reports["train"].bad_entries == 4 and data.reports["train"].kept == 3


def test_unreadable_compressed_and_weighted_shards_are_refused(tmp_path: Path) -> None:
    good = write_tar(tmp_path / "0000.tar", sample_members(0) + sample_members(1))
    whole = good.read_bytes()
    (tmp_path / "0001.tar").write_bytes(whole[:1300])  # cut inside the second member's data
    with pytest.raises(DataError, match=r"0001\.tar: cannot read the tar shard .*skip_bad=true"):
        load_webdataset(tmp_path, files="0001.tar", streaming=False)
    with pytest.warns(UserWarning, match=r"0001\.tar, .*shard unreadable"):
        kept = load_webdataset(tmp_path, files="{0000..0001}.tar", streaming=False, skip_bad=True)
    assert [number(c[0]) for c in kept["train"]["captions"]] == [0, 1]
    (tmp_path / "0002.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(DataError, match=r"0002\.tar: cannot read the tar shard at its start"):
        load_webdataset(tmp_path, files="0002.tar", streaming=False)

    (tmp_path / "0003.tar.gz").write_bytes(gzip.compress(whole))
    (tmp_path / "0004.tar").write_bytes(gzip.compress(whole))  # gzip under a plain name
    for name in ("0003.tar.gz", "0004.tar"):
        with pytest.raises(DataError, match=rf"{name}: a compressed shard \(gzip\) cannot be indexed for random "
                                            r"access.*Use plain \.tar shards.*data_kwargs\.streaming=true"):
            load_webdataset(tmp_path, files=name, streaming=False)
    assert len(list(load_webdataset(tmp_path, files="0003.tar.gz")["train"])) == 2  # it streams

    with pytest.raises(DataError, match=r"split 'train' mixes sources by weight \(::0\.7, ::0\.3\).*expected shard "
                                        r"patterns without '::<weight>'"):
        load_webdataset(tmp_path, files="0000.tar::0.7,0001.tar::0.3", streaming=False)


def test_images_are_decoded_when_read_or_at_load_with_verify_images(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "0000.tar", [*sample_members(0), ("000001.png", b"garbage"),
                                              ("000001.txt", b"an image that does not decode"), *sample_members(2)])
    data = load_webdataset(files=str(shard), streaming=False)
    assert len(data["train"]) == 3  # indexing reads no image
    with pytest.raises(DataError, match=r"0000\.tar, 000001: cannot decode image"):
        data.images(shard_reference(str(shard), "000001"))
    with pytest.raises(DataError, match=r"0000\.tar#000001, key 000001 of .*0000\.tar: cannot decode image"):
        load_webdataset(files=str(shard), streaming=False, verify_images=True)
    with pytest.warns(UserWarning, match="skipped 1 bad entries"):
        verified = load_webdataset(files=str(shard), streaming=False, verify_images=True, skip_bad=True)
    assert [number(c[0]) for c in verified["train"]["captions"]] == [0, 2]

    shard.write_bytes(shard.read_bytes()[:600])  # changed after indexing: the first image is cut
    with pytest.raises(DataError, match=r"0000\.tar, 000000: the shard ends .* bytes into the image member"):
        data.images.read_bytes(shard_reference(str(shard), "000000"))


# --------------------------------------------------------------------------------------
# The command line: data check, caption-match, fusionzoo train
# --------------------------------------------------------------------------------------
def test_data_check_and_caption_match_read_the_indexed_shards(folder: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "check", "data=webdataset", f"data_dir={folder}", "data_kwargs.streaming=false"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "data=webdataset: map-style, splits train, val" in out
    train = out.split("split train:")[1].split("split val:")[0]
    assert "samples        6" in train and "images         6" in train and "problems       none" in train
    assert "captions       4" in out.split("split val:")[1]
    assert "task=captioning: 6 rows of split 'train'" in out
    assert "caption-match data_kwargs.source=webdataset: 12 rows" in out

    match = DATASETS.get("caption-match")(folder, source="webdataset", streaming=False, splits=["train"])
    assert len(match["train"]) == 12 and match.images is not None


def test_streamed_shards_are_refused_by_fusionzoo_train_with_the_option_named(folder: Path) -> None:
    streamed = DATASETS.get("webdataset")(folder)
    with pytest.raises(ConfigError, match=r"is streamed\..*data=webdataset data_kwargs\.streaming=false"):
        refuse_streamed(streamed, load_config(None, ["task=captioning", "data=webdataset", f"data_dir={folder}"]))


RUNS = {
    "captioning": ["task=captioning", "data=webdataset", "fusion=early_concat", "fusion_kwargs.dim=16"],
    "retrieval": ["task=retrieval", "data=webdataset", "fusion=merged_transformer",
                  'fusion_kwargs={"dim": 16, "num_layers": 1, "num_heads": 2}'],
    "classification": ["task=classification", "data=caption-match", "data_kwargs.source=webdataset",
                       "fusion=early_concat", "fusion_kwargs.dim=16"],
}


@pytest.mark.parametrize("task", list(RUNS))
def test_fusionzoo_train_finetunes_from_indexed_shards(folder: Path, tmp_path: Path, task: str) -> None:
    out = tmp_path / "run"
    train(load_config(None, [*RUNS[task], f"data_dir={folder}", "data_kwargs.streaming=false", "vision=tiny",
                             "text=tiny", "feature_cache=false", "batch_size=4", "max_steps=3", "max_eval_samples=0",
                             "log_with=none", "max_text_len=10", "seed=0", f"output_dir={out}"]))
    assert (out / "final" / "model.safetensors").is_file()
    assert json.loads((out / "final" / "run.json").read_text())["step"] == 3


@pytest.mark.parametrize("kind", ["captioning", "pretrain"])
def test_indexed_shard_images_are_cached_by_their_member_bytes(folder: Path, tmp_path: Path, kind: str) -> None:
    """With the feature cache (frozen encoders): the first run extracts the members' tokens, a second finds them;
    for fine-tuning and for pretraining from indexed shards."""
    from fusionzoo.training.pretrain import pretrain, pretrain_base_config

    def run(name: str) -> dict:
        out = tmp_path / name
        common = [f"data_dir={folder}", "data_kwargs.streaming=false", "vision=tiny", "text=tiny", "batch_size=4",
                  "max_steps=2", "max_eval_samples=0", "log_with=none", "max_text_len=10", "seed=0",
                  f"cache_dir={tmp_path / 'cache'}", f"output_dir={out}"]
        if kind == "pretrain":
            pretrain(load_config(None, ["data=webdataset", *common,
                                        'fusion_kwargs={"dim": 16, "embed_dim": 8, "num_layers": 1, "num_heads": 2}'],
                                 base=pretrain_base_config()))
        else:
            train(load_config(None, [*RUNS["captioning"], *common]))
        return json.loads((out / "final" / "run.json").read_text())["feature_cache"]

    first, second = run("a"), run("b")
    assert first["misses"] >= 1 and second["misses"] == 0 and second["extraction_seconds"] == 0
    (image,) = [e for e in first["entries"] if e["name"].startswith("image-")]
    assert any(e["key"] == image["key"] and e["hit"] for e in second["entries"])
