"""Training on the feature cache: the losses of an uncached run, on one process and two; each entry extracted once.

The references run without the cache (``feature_cache=false``), their frozen encoders' outputs
rounded to float16 with padding zeroed, as the cache stores them (``fixtures.features_as_cached``);
the cached runs match them to float32 noise (measured: relative differences up to ~2e-6; the
test allows 1e-5). Without the rounding the losses would differ by the float16 rounding of the
features. Two tasks and fusions: ``fusionzoo pretrain`` with ``merged_transformer`` (image tokens
and the clean captions' states from the cache, the masked copy encoded live) and ``fusionzoo
train task=captioning`` with ``co_attention`` (image tokens and the causal encoder's caption
states from the cache). The 2-process runs (gloo, one ``torchrun`` launch of ``run_jobs.py``)
extract together, each process its share of the blocks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from fusionzoo.encoders import VisionEncoder, build_vision_encoder
from fusionzoo.features import extract
from fusionzoo.features.cache import FeatureCache
from fusionzoo.features.layout import CacheError
from fusionzoo.features.manage import stored_entries
from fusionzoo.features.extract import image_features, image_preprocessing
from fusionzoo.model import FusionModel
from fusionzoo.training.config import ConfigError, load_config
from fusionzoo.training.pretrain import pretrain, pretrain_base_config
from fusionzoo.training.pretrain_model import PretrainModel
from fusionzoo.training.trainer import train

from fixtures import _square, features_as_cached, train_log, write_karpathy_captions
from test_distributed import _torchrun

HERE = Path(__file__).resolve().parent
QUIET = ["vision=tiny", "text=tiny", "log_with=none", "log_every=1", "seed=1", "max_eval_samples=0"]
FUSION = {"dim": 16, "num_layers": 1, "num_heads": 2, "dropout": 0.0}
STEPS = 6
KINDS = ("pretrain", "captioning")
AS_CACHED_PLUGIN = "from fixtures import install_features_as_cached\n\ninstall_features_as_cached()\n"


def _args(kind: str, data: Path, out: Path, cache: Path, batch: int, steps: int = STEPS,
          dropout: float = 0.0) -> list[str]:
    fusion = json.dumps({**FUSION, "dropout": dropout})
    common = [f"data_dir={data}", *QUIET, "max_text_len=12", f"fusion_kwargs={fusion}", f"batch_size={batch}",
              f"max_steps={steps}", "warmup_ratio=0.3", "lr=3e-3", f"output_dir={out}", f"cache_dir={cache}"]
    if kind == "pretrain":
        return ["fusion=merged_transformer", "align_kwargs.embed_dim=8", *common]
    return ["task=captioning", "fusion=co_attention", "data=karpathy-captions", *common]


def _run(kind: str, args: list[str]) -> None:
    if kind == "pretrain":
        pretrain(load_config(None, args, base=pretrain_base_config()))
    else:
        train(load_config(None, args))


def _job(kind: str, args: list[str], **extra) -> dict:
    return {"kind": "pretrain" if kind == "pretrain" else "train", "overrides": args, **extra}


def _cache_stats(run: Path) -> dict:
    return json.loads((run / "final" / "run.json").read_text())["feature_cache"]


def _compare_logs(one: Path, other: Path, steps: int = STEPS) -> None:
    log_one, log_other = train_log(one), train_log(other)
    assert sorted(log_one)[:steps] == sorted(log_other)[:steps] == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        keys = [k for k in log_one[step] if k.split("/")[-1] in ("loss", "itc", "itm", "mlm", "lm")]
        assert len(keys) >= 2
        for key in keys:
            assert log_other[step][key] == pytest.approx(log_one[step][key], rel=1e-5, abs=1e-6), (step, key)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_karpathy_captions(tmp_path_factory.mktemp("captions"), {"train": 40, "val": 4})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def uncached(data: Path, runs: Path) -> dict[str, Path]:
    """One process, no cache, the features rounded as the cache stores them (batch 8, with dropout)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PretrainModel, "forward", features_as_cached(PretrainModel.forward))
        patch.setattr(FusionModel, "forward", features_as_cached(FusionModel.forward))
        for kind in KINDS:
            _run(kind, [*_args(kind, data, runs / f"uncached-{kind}", runs / "unused-cache", 8, dropout=0.1),
                        "feature_cache=false"])
    assert not (runs / "unused-cache").exists()  # feature_cache=false reads and writes no cache
    assert "feature_cache" not in json.loads((runs / "uncached-pretrain" / "final" / "run.json").read_text())
    return {kind: runs / f"uncached-{kind}" for kind in KINDS}


@pytest.fixture(scope="module")
def cached(data: Path, runs: Path) -> dict[str, Path]:
    """One process with a fresh cache (batch 8), then each kind again with the cache filled.

    With dropout: a run that extracts draws the same dropout masks as one that finds its features.
    """
    for kind in KINDS:
        _run(kind, _args(kind, data, runs / f"cached-{kind}", runs / "cache-one", 8, dropout=0.1))
        _run(kind, _args(kind, data, runs / f"cached-{kind}-again", runs / "cache-one", 8, dropout=0.1))
    return {kind: runs / f"cached-{kind}" for kind in KINDS}


@pytest.fixture(scope="module")
def launched(data: Path, runs: Path) -> Path:
    """One 2-process launch (batch 4 a process): both kinds with a fresh cache, pretraining again with the
    cache filled, then both kinds without the cache, their features rounded as the cache stores them."""
    cache = runs / "cache-two"
    plugin = runs / "as_cached_plugin.py"
    plugin.write_text(AS_CACHED_PLUGIN)
    jobs = [_job(kind, _args(kind, data, runs / f"two-{kind}", cache, 4)) for kind in KINDS]
    jobs.append(_job("pretrain", _args("pretrain", data, runs / "two-pretrain-again", cache, 4, steps=2)))
    jobs += [_job(kind, [*_args(kind, data, runs / f"two-uncached-{kind}", cache, 4), "feature_cache=false"],
                  plugins=[str(plugin)] if kind == KINDS[0] else []) for kind in KINDS]
    (runs / "jobs.json").write_text(json.dumps(jobs))
    result = _torchrun(str(HERE / "run_jobs.py"), str(runs / "jobs.json"), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return runs


@pytest.mark.parametrize("kind", KINDS)
def test_one_process_with_the_cache_trains_like_without_it_and_extracts_once(
        cached: dict[str, Path], uncached: dict[str, Path], kind: str) -> None:
    _compare_logs(uncached[kind], cached[kind])
    first = _cache_stats(cached[kind])
    assert first["misses"] >= 1 and first["texts_cached"]
    again = cached[kind].with_name(cached[kind].name + "-again")
    second = _cache_stats(again)
    assert second["misses"] == 0 and second["hits"] == first["hits"] + first["misses"] == 2
    assert second["extraction_seconds"] == 0
    _compare_logs(cached[kind], again)


def test_pretraining_and_captioning_share_the_image_entry(cached: dict[str, Path]) -> None:
    pretraining, captioning = _cache_stats(cached["pretrain"]), _cache_stats(cached["captioning"])
    assert [e["name"] for e in pretraining["entries"]] == ["image-tiny-32px", "text-tiny"]
    assert not any(e["hit"] for e in pretraining["entries"])  # the first run of this cache
    image, text = captioning["entries"]
    assert image["hit"] and image["key"] == pretraining["entries"][0]["key"]
    assert text["name"] == "text-tiny-causal" and not text["hit"]  # the causal encoder's own states


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_extract_together_and_train_like_without_the_cache(launched: Path, kind: str) -> None:
    two = launched / f"two-{kind}"
    _compare_logs(launched / f"two-uncached-{kind}", two)
    run = json.loads((two / "final" / "run.json").read_text())
    assert run["num_processes"] == 2 and len(set(run["param_checksums"])) == 1
    assert run["feature_cache"]["misses"] >= 1
    assert "feature_cache" not in json.loads((launched / f"two-uncached-{kind}" / "final" / "run.json").read_text())


def test_a_second_two_process_run_extracts_nothing_and_the_entries_equal_one_process_ones(
        launched: Path, cached: dict[str, Path]) -> None:
    stats = _cache_stats(launched / "two-pretrain-again")
    assert stats["misses"] == 0 and stats["hits"] == 2
    one, two = (stored_entries(launched / name) for name in ("cache-one", "cache-two"))
    assert all(e.complete for e in [*one, *two]) and len(one) == len(two) == 3
    assert {e.path.name for e in one} == {e.path.name for e in two}  # the same keys
    for entry in two:
        built_by_two = entry.meta
        assert built_by_two["blocks"]["count"] >= 2  # shared out between the two processes
        for array in entry.path.glob("*.npy"):
            np.testing.assert_allclose(np.load(array).astype(np.float32),
                                       np.load(launched / "cache-one" / entry.path.name / array.name).astype(
                                           np.float32), rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------
# Interrupted, damaged and refused
# --------------------------------------------------------------------------------------
@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    paths = []
    for k in range(18):
        path = tmp_path / "images" / f"{k:02d}.png"
        _square(path, ("red", "green", "blue")[k % 3], (k % 5 - 2, k // 5 % 5 - 2))
        paths.append(str(path))
    return paths


class _CountingDecoder:
    """Counts the images extraction decodes; raises once ``fail_after`` were decoded (an interrupted run)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None) -> None:
        self.decoded, self.fail_after = 0, fail_after
        open_image = extract.open_image

        def counting(path, **kwargs):
            if self.fail_after is not None and self.decoded >= self.fail_after:
                raise RuntimeError("interrupted (test)")
            self.decoded += 1
            return open_image(path, **kwargs)

        monkeypatch.setattr(extract, "open_image", counting)


def _tiny_vision() -> VisionEncoder:
    import torch

    torch.manual_seed(0)
    vision = build_vision_encoder("tiny", pretrained=False)
    vision.freeze()
    return vision


def _extract(cache: FeatureCache, vision: VisionEncoder, paths: list[str]):
    return image_features(cache, vision, paths, image_preprocessing(vision, None, crop=True), batch_size=3,
                          block_rows=6, workers=0, progress=False)


def test_an_interrupted_extraction_resumes_without_recomputing_the_rows_done(
        images: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vision = _tiny_vision()
    reference = _extract(FeatureCache(tmp_path / "reference"), vision, images)["tokens"]

    counter = _CountingDecoder(monkeypatch, fail_after=9)  # blocks of 6: the first done, the second half done
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="interrupted"):
        _extract(FeatureCache(root), vision, images)
    (staging,) = stored_entries(root)
    assert not staging.complete  # not an entry: `fusionzoo cache list` shows an unfinished extraction
    assert sorted(p.name for p in (staging.path / "done").iterdir()) == ["00000000.json"]

    counter.decoded, counter.fail_after = 0, None
    cache = FeatureCache(root)
    entry = _extract(cache, vision, images)
    assert counter.decoded == len(images) - 6  # the block marked done was neither decoded nor encoded again
    assert not entry.hit and cache.misses == 1 and entry.meta["blocks"]["resumed"] == 1
    np.testing.assert_array_equal(entry["tokens"], reference)
    assert [e.complete for e in stored_entries(root)] == [True]  # the staging folder became the entry

    counter.decoded = 0
    again = FeatureCache(root)
    assert _extract(again, vision, images).hit and again.hits == 1 and counter.decoded == 0


def test_a_damaged_entry_or_build_is_never_read(images: list[str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    vision = _tiny_vision()
    root = tmp_path / "cache"
    entry = _extract(FeatureCache(root), vision, images)
    reference = np.array(entry["tokens"])
    counter = _CountingDecoder(monkeypatch)

    tokens = entry.path / "tokens.npy"
    with open(tokens, "r+b") as handle:  # a file cut short (a disk that filled up, a copy stopped half way)
        handle.truncate(tokens.stat().st_size // 2)
    cache = FeatureCache(root)
    rebuilt = _extract(cache, vision, images)
    assert cache.misses == 1 and counter.decoded == len(images)
    np.testing.assert_array_equal(rebuilt["tokens"], reference)

    (rebuilt.path / "meta.json").write_text("{not json")  # a meta.json half written by hand
    counter.decoded = 0
    assert not _extract(FeatureCache(root), vision, images).hit and counter.decoded == len(images)

    # An interrupted build whose plan is damaged starts afresh instead of trusting its markers.
    counter.decoded, counter.fail_after = 0, 9
    other = image_preprocessing(vision, None, crop=False)  # another key: a build of its own
    with pytest.raises(RuntimeError):
        image_features(FeatureCache(root), vision, images, other, batch_size=3, block_rows=6, workers=0,
                       progress=False)
    (staging,) = [e for e in stored_entries(root) if not e.complete]
    (staging.path / "plan.json").write_text("[]")
    counter.decoded, counter.fail_after = 0, None
    image_features(FeatureCache(root), vision, images, other, batch_size=3, block_rows=6, workers=0, progress=False)
    assert counter.decoded == len(images)


def test_processes_that_do_not_share_the_cache_folder_are_told_so(images: list[str], tmp_path: Path) -> None:
    class Elsewhere:
        """Process 1 of 2, whose cache folder is not process 0's (it never sees process 0's plan)."""

        index, count = 1, 2

        def any(self, flag: bool) -> bool:
            return True

        def broadcast(self, value):
            return {"token": "written by process 0", "todo": [0], "arrays": {}, "blocks": 1, "block_rows": 18}

    with pytest.raises(CacheError, match="not one folder for every process"):
        _extract(FeatureCache(tmp_path / "cache", processes=Elsewhere()), _tiny_vision(), images)


def test_feature_cache_true_says_why_it_cannot_be_used(data: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(HERE.parent / "data"))
    from image_text_fixtures import write_shards

    args = _args("pretrain", data, tmp_path / "run", tmp_path / "cache", 4, steps=1)
    with pytest.raises(ConfigError, match="freeze_encoders=false"):
        _run("pretrain", [*args, "freeze_encoders=false", "feature_cache=true"])
    write_shards(tmp_path / "shards", 1, 8)
    streamed = [*args, "data=webdataset", f"data_dir={tmp_path / 'shards'}", "feature_cache=true"]
    with pytest.raises(ConfigError, match="is streamed"):
        _run("pretrain", streamed)
    assert not (tmp_path / "cache").exists()


def test_an_image_that_does_not_decode_is_left_out_with_skip_bad(tmp_path: Path) -> None:
    from fusionzoo.data.checks import DataError

    data = write_karpathy_captions(tmp_path / "captions", {"train": 12})
    (data / "images" / "sq_0003.png").write_bytes(b"not a png")
    args = _args("captioning", data, tmp_path / "run", tmp_path / "cache", 4, steps=2)
    with pytest.raises(DataError, match="sq_0003.png"):
        _run("captioning", args)
    _run("captioning", [*args, "skip_bad=true"])  # the extraction resumes, notes the image and goes on
    (images,) = [e for e in stored_entries(tmp_path / "cache") if e.name.startswith("image-")]
    assert list(images.meta["info"]["bad_rows"]) == ["3"] and "sq_0003.png" in images.meta["info"]["bad_rows"]["3"]
    with pytest.raises(DataError, match="did not decode when their features were extracted"):
        _run("captioning", [*args, "overwrite=true"])  # the entry says so; without skip_bad that is an error
