"""``fusionzoo data check``: counts, sizes, problems by name, what a task would train on; bad sources exit 2.

Each test writes a small source (JSONL files, webdataset shards) and runs the command through
``fusionzoo.cli.main``, the code path of the ``fusionzoo`` executable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fusionzoo.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from image_text_fixtures import (  # noqa: E402
    picture,
    png_bytes,
    sample_members,
    write_image_text_folder,
    write_jsonl,
    write_shards,
    write_tar,
)


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["data", "check", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_jsonl_report_counts_sizes_missing_and_unreadable_files(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    write_image_text_folder(tmp_path, {"train": 6, "val": 2})
    lines = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    lines.append({"image": "images/gone.png", "caption": "an image that was never downloaded"})
    lines.append({"image": "images/0000.png", "caption": "a second caption of image zero"})
    (tmp_path / "images" / "0005.png").write_bytes(b"not a png")
    write_jsonl(tmp_path / "train.jsonl", lines)

    code, out, err = check(capsys, "data=image-text-jsonl", f"data_dir={tmp_path}")
    assert code == 0, err
    train = out.split("split train:")[1].split("split val:")[0]
    assert "samples        6" in train  # image rows (gone.png left out and listed below)
    assert "images         5" in train and "captions       7" in train
    assert "image width    min 8, median 10, max 12" in train
    assert "caption words  min 5, median 5, max 6" in train
    assert "images not on disk: 1" in train and str(tmp_path / "images" / "gone.png") in train
    assert "images that do not decode: 1" in train and "0005.png" in train
    assert "problems       none" in out.split("split val:")[1]
    assert "fusionzoo pretrain: 7 image-caption pairs of split 'train'" in out
    assert "task=retrieval: 7 rows" in out and "caption-match data_kwargs.source=image-text-jsonl: 14 rows" in out

    code, out, _ = check(capsys, "data=image-text-jsonl", f"data_dir={tmp_path}", "limit=3", "splits=val", "--json")
    result = json.loads(out)
    assert code == 0 and result["splits"] == ["val"]
    assert result["reports"][0]["samples"] == 2 and not result["reports"][0]["limited"]


def test_webdataset_report_names_bad_members_and_honours_limit(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    write_shards(tmp_path / "shards", 3, 4)
    write_tar(tmp_path / "shards" / "0003.tar", [*sample_members(50), ("000051.png", png_bytes(picture(51))),
                                                 ("000052.jpg", b"garbage"), ("000052.txt", b"a caption")])
    code, out, err = check(capsys, "data=webdataset", f"data_dir={tmp_path}",
                           "data_files=shards/{0000..0003}.tar", "data_kwargs.max_bad_fraction=0.5")
    assert code == 0, err
    assert "streamed (iterable)" in out
    assert "samples        15" in out and "images         13" in out
    assert "samples without an image or a caption: 1" in out and "0003.tar, 000051: no caption" in out
    assert "images that do not decode: 1" in out and "0003.tar, 000052: cannot decode image" in out
    assert "fusionzoo pretrain: 13 image-caption pairs of split 'train' (streamed: training needs max_steps)" in out

    code, out, _ = check(capsys, "data=webdataset", f"data_dir={tmp_path}", "data_files=shards/*.tar", "limit=5",
                         "--json")
    report = json.loads(out)["reports"][0]
    assert code == 0 and report["limited"] and report["samples"] == 5 and report["images"] == 5


def test_bad_sources_exit_2_with_one_line_naming_file_and_entry(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    write_image_text_folder(tmp_path, {"train": 2})
    write_jsonl(tmp_path / "train.jsonl", [{"image": "images/0000.png", "caption": "ok"}, {"image": "images/0001.png"}])
    code, out, err = check(capsys, "data=image-text-jsonl", f"data_dir={tmp_path}")
    assert code == 2 and out == ""
    assert "train.jsonl, line 2: missing key 'caption'" in err and "Traceback" not in err

    write_tar(tmp_path / "s" / "0000.tar", [("000001.png", b"x"), ("000001.txt", b"y")] * 1)
    code, _, err = check(capsys, "data=webdataset", f"data_dir={tmp_path / 's'}")
    assert code == 2 and "1 of 1 samples read from split 'train' are bad" in err and "0000.tar, 000001" in err

    (tmp_path / "s" / "0001.tar").write_bytes(b"this is not a tar file" * 40)
    code, _, err = check(capsys, "data=webdataset", f"data_dir={tmp_path}", "data_files=s/0001.tar")
    assert code == 2 and "0001.tar: cannot read the tar shard" in err and "Traceback" not in err

    code, _, err = check(capsys, "data=webdataset", f"data_dir={tmp_path}", "data_files=s/{0000..0002}.tar")
    assert code == 2 and "0002.tar, from 's/{0000..0002}.tar': shard not found" in err

    code, _, err = check(capsys, "data=webdataset", "limit=zero")
    assert code == 2 and "key 'limit' expects an integer" in err
