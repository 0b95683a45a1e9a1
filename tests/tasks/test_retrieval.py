"""Retrieval with every fusion: ITC embeddings, ITM matching, reranked score matrices, train / eval / score.

Independent computations: the reranked matrices against ITM scores computed pair by pair,
recall against the score-file tool, ALBEF's alignment against its own forward pass.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fusionzoo
from fusionzoo.factory import create_model
from fusionzoo.model import load_model
from fusionzoo.tasks.retrieval import (ITC_WEIGHT_GRID, UNCHOSEN_ITC_WEIGHT, Captions, Gallery, choose_ranking,
                                      ranked_matrices, reranked_matrix, saved_itc_weight, score_matrices)
from fusionzoo.tasks.retrieval_eval import load_scores, recall_at_k, score_retrieval

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from fixtures import write_karpathy_captions  # noqa: E402

FUSIONS = [f for f in fusionzoo.list_fusions() if fusionzoo.FUSIONS.get(f).__module__.startswith("fusionzoo.")]
TINY = {"dim": 32, "num_heads": 2}
TEXTS = ["a red square on white", "the square is blue", "a green square", "the square is red"]


def build(fusion: str) -> fusionzoo.FusionModel:
    torch.manual_seed(0)
    return create_model("retrieval", fusion, "tiny", "tiny", pretrained=False, fusion_kwargs=TINY,
                        align_kwargs={"embed_dim": 16}).eval()


def pixels(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_embeds_apart_and_matches_jointly(fusion: str, tmp_path: Path) -> None:
    model = build(fusion)
    assert (model.align is None) == model.fusion.aligns
    images, texts = model.embed_images(pixels()), model.embed_texts(TEXTS)
    assert images.shape == texts.shape and images.shape[0] == 4
    assert torch.allclose(images.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(texts.norm(dim=-1), torch.ones(4), atol=1e-5)
    match = model.match(pixels(), TEXTS)
    with torch.no_grad():  # independently: the fused pooled state through the ITM head's Linear
        batch = model.text.tokenize(TEXTS, max_length=model.max_text_len)
        text = model.text(batch["input_ids"], batch["attention_mask"]).states
        fused = model.fusion(text, batch["attention_mask"].bool(), model.vision(pixels()).tokens)
        logits = model.head.linear(fused.pooled)
    assert torch.allclose(match, torch.softmax(logits, -1)[:, 1], atol=1e-5)
    from PIL import Image

    photos = [Image.new("RGB", (40, 30), colour) for colour in ("red", "green", "blue", "white")]
    said = ["match" if p > 0.5 else "no match" for p in model.match(photos, TEXTS).tolist()]
    assert model.predict(photos, TEXTS) == said

    assert model.embed_images([]).shape == model.embed_texts([]).shape == (0, model.embed_dim)
    assert model.match([], []).shape == (0,)

    loaded = load_model(model.save_pretrained(tmp_path / "model"))
    assert torch.equal(loaded.embed_images(pixels()), images)
    assert torch.equal(loaded.embed_texts(TEXTS), texts)
    assert torch.equal(loaded.match(pixels(), TEXTS), match)


def test_albef_embeds_what_its_forward_aligns() -> None:
    model = build("albef")
    with torch.no_grad():
        batch = model.text.tokenize(TEXTS, max_length=model.max_text_len)
        mask = batch["attention_mask"].bool()
        text = model.text(batch["input_ids"], batch["attention_mask"]).states
        image = model.vision(pixels()).tokens
        aux = model.fusion(text, mask, image).aux
        assert torch.allclose(model.embed_image_states(image), aux["image_embed"], atol=1e-6)
        assert torch.allclose(model.embed_text_states(text, mask), aux["text_embed"], atol=1e-6)


def test_a_model_without_alignment_says_what_to_train() -> None:
    model = create_model("vqa", "early_concat", "tiny", "tiny", pretrained=False, answers=["yes", "no"])
    with pytest.raises(TypeError, match="task=retrieval"):
        model.embed_texts(["a dog"])
    with pytest.raises(ValueError, match="align_kwargs"):
        create_model("vqa", "early_concat", "tiny", "tiny", pretrained=False, answers=["yes"],
                     align_kwargs={"embed_dim": 8})


def _embedded(model: fusionzoo.FusionModel, n_images: int = 5) -> tuple[Gallery, Captions]:
    """Five images with two captions each (caption c belongs to image c // 2)."""
    texts = [f"a {c} square" for c in ("red", "green", "blue", "yellow", "black")] + \
            [f"the square is {c}" for c in ("red", "green", "blue", "yellow", "black")]
    texts = [texts[i // 2 + (i % 2) * 5] for i in range(2 * n_images)]
    with torch.no_grad():
        image = model.vision(pixels(n_images)).tokens
        batch = model.text.tokenize(texts, max_length=model.max_text_len)
        mask = batch["attention_mask"].bool()
        states = model.text(batch["input_ids"], batch["attention_mask"]).states
        gallery = Gallery(torch.arange(100, 100 + n_images), model.embed_image_states(image), image)
        captions = Captions(torch.arange(len(texts)), torch.arange(len(texts)) // 2,
                            model.embed_text_states(states, mask), states, mask)
    return gallery, captions


@pytest.mark.parametrize("fusion", ["merged_transformer", "albef"])
def test_rerank_all_ranks_every_pair_by_itm(fusion: str) -> None:
    model = build(fusion)
    gallery, captions = _embedded(model)
    scores = score_matrices(model, gallery, captions, rerank_k="all", rerank_batch_size=3)
    expected = torch.empty(5, 10)
    with torch.no_grad():
        for i in range(5):
            for c in range(10):  # one pair at a time, unpadded
                width = int(captions.mask[c].sum())
                expected[i, c] = model.match_states(captions.states[c:c + 1, :width], captions.mask[c:c + 1, :width],
                                                    gallery.tokens[i:i + 1])[0]
    assert torch.allclose(scores["i2t"], expected, atol=1e-4)
    assert torch.allclose(scores["t2i"], expected.t(), atol=1e-4)
    assert torch.allclose(scores["itc_i2t"], gallery.embed @ captions.embed.t(), atol=1e-6)
    assert torch.equal(scores["itc_t2i"], scores["itc_i2t"].t())

    # A shortlist of 3: those 3 keep their ITM scores; the rest follow ITC, below every shortlisted one.
    short = score_matrices(model, gallery, captions, rerank_k=3)
    top = torch.argsort(scores["itc_i2t"], dim=1, descending=True, stable=True)[:, :3]
    for i in range(5):
        chosen = set(top[i].tolist())
        rest = [c for c in range(10) if c not in chosen]
        assert torch.allclose(short["i2t"][i, top[i]], expected[i, top[i]], atol=1e-4)
        assert short["i2t"][i, rest].max() < short["i2t"][i, top[i]].min()
        order = torch.argsort(short["i2t"][i, rest], descending=True).tolist()
        assert order == torch.argsort(scores["itc_i2t"][i, rest], descending=True).tolist()

    mixed = score_matrices(model, gallery, captions, rerank_k="all", rerank_itc_weight=0.5)
    temperature = float(model.aligner.itc_temperature().detach())
    assert torch.allclose(mixed["i2t"], expected + 0.5 * scores["itc_i2t"] / temperature, atol=1e-3)


def test_reranked_matrix_puts_the_shortlist_first() -> None:
    itc = torch.tensor([[0.9, 0.1, 0.5, -0.2]])
    matrix = reranked_matrix(itc, torch.tensor([[0, 2]]), torch.tensor([[-3.0, 4.0]]))
    assert matrix[0, 2] == 4.0 and matrix[0, 0] == -3.0
    assert matrix[0, 1] < -3.0 and matrix[0, 3] < matrix[0, 1]  # ITC order below the shortlist


@pytest.fixture(scope="module")
def captions_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_karpathy_captions(tmp_path_factory.mktemp("cap"), {"train": 24, "val": 4, "test": 6})


@pytest.fixture(scope="module")
def trained(captions_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fusionzoo.cli import main

    out = tmp_path_factory.mktemp("retrieval") / "run"
    code = main(["train", "task=retrieval", "fusion=co_attention", "data=karpathy-captions",
                 f"data_dir={captions_root}", "vision=tiny", "text=tiny", 'fusion_kwargs={"dim": 16, "num_heads": 2}',
                 "batch_size=8", "max_steps=6", "lr=3e-3", "max_text_len=10", "log_with=none",
                 f"output_dir={out}"])
    assert code == 0
    return out


RECALL_KEYS = {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}


def test_train_eval_and_score_agree(trained: Path, captions_root: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from fusionzoo.cli import main

    saved = json.loads((trained / "final" / "config.json").read_text())
    assert saved["task"] == "retrieval" and saved["head"]["name"] == "itm" and saved["align"]["embed_dim"] == 256
    # rerank_itc_weight=auto: chosen on the validation split (the best r_mean of the grid), saved with the model
    chosen = saved["retrieval"]
    assert chosen["chosen_on"] == "val" and chosen["rerank_itc_weight"] in ITC_WEIGHT_GRID
    final = json.loads((trained / "metrics.json").read_text())["latest"]  # the last validation scores
    assert final["r_mean"] == max(chosen["r_mean"].values()) == chosen["r_mean"][f"{chosen['rerank_itc_weight']:g}"]
    assert final["rerank_itc_weight"] == chosen["rerank_itc_weight"]
    capsys.readouterr()
    results = tmp_path / "scores.npz"
    assert main(["eval", str(trained), "split=test", "rerank_k=4", f"results={results}"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert RECALL_KEYS | {f"itc_{k}" for k in RECALL_KEYS} | {"seconds_per_query", "itc_seconds_per_query"} \
        <= set(metrics)
    assert metrics["num_images"] == 6 and metrics["num_captions"] == 12 and metrics["rerank_k"] == 4
    assert metrics["rerank_itc_weight"] == chosen["rerank_itc_weight"]  # eval uses the saved choice
    assert metrics["r_mean"] == pytest.approx(np.mean([metrics[k] for k in RECALL_KEYS - {"r_mean"}]))

    scores = load_scores(results)  # what `fusionzoo score retrieval` reads
    assert sorted(scores.image_ids.tolist()) == list(range(1000 + 28, 1000 + 34))
    recomputed = score_retrieval(captions_root / "dataset_coco.json", scores)
    assert recomputed == pytest.approx({k: metrics[k] for k in RECALL_KEYS})
    with np.load(results) as archive:
        owner = np.array([list(scores.image_ids).index(1000 + c // 2) for c in scores.caption_ids])
        itc = recall_at_k(archive["itc_i2t"], archive["itc_t2i"], owner)
    assert itc == pytest.approx({k: metrics[f"itc_{k}"] for k in RECALL_KEYS})

    assert main(["score", "retrieval", "--annotations", str(captions_root / "dataset_coco.json"),
                 "--scores", str(results)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[0]) == pytest.approx(recomputed)


def test_init_from_pretraining_carries_alignment_and_itm_head(captions_root: Path, tmp_path: Path) -> None:
    import safetensors.torch

    from fusionzoo.training.config import load_config
    from fusionzoo.training.pretrain import pretrain, pretrain_base_config
    from fusionzoo.training.trainer import load_matching_weights

    out = tmp_path / "pre"
    pretrain(load_config(None, [f"data_dir={captions_root}", "fusion=merged_transformer", "vision=tiny", "text=tiny",
                                'fusion_kwargs={"dim": 16, "num_heads": 2}', "batch_size=4", "max_steps=2",
                                "max_text_len=10", "log_with=none", "max_eval_samples=0", f"output_dir={out}"],
                         base=pretrain_base_config()))
    saved = safetensors.torch.load_file(str(out / "final" / "model.safetensors"))
    model = create_model("retrieval", "merged_transformer", "tiny", "tiny", pretrained=False,
                         fusion_kwargs={"dim": 16, "num_heads": 2}, max_text_len=10)
    load_matching_weights(model, out)
    assert torch.equal(model.head.linear.weight, saved["itm.head.weight"])
    assert torch.equal(model.align.image_proj.weight, saved["align.image_proj.weight"])
    assert torch.equal(model.align.temperature, saved["align.temperature"])


def test_flickr30k_karpathy_files_load(tmp_path: Path) -> None:
    """dataset_flickr30k.json: no cocoid and no filepath; images are keyed by imgid."""
    from PIL import Image

    from fusionzoo.registry import DATASETS

    images = []
    for k, split in enumerate(["train", "train", "test"]):
        Image.new("RGB", (16, 16), (40 * k, 0, 0)).save(tmp_path / f"{k}.jpg")
        images.append({"filename": f"{k}.jpg", "imgid": k, "split": split,
                       "sentences": [{"raw": f"picture {k}", "sentid": 10 * k}, {"raw": f"photo {k}", "sentid": 10 * k + 1}]})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    data = DATASETS.get("karpathy-captions")(root=tmp_path)
    pairs = data.pairs("test").with_format(None)
    assert pairs["image_id"] == [2, 2] and pairs["caption_id"] == [20, 21]
    assert score_retrieval(tmp_path / "dataset_flickr30k.json", _perfect_scores(pairs))["r_mean"] == 100.0


def _perfect_scores(pairs):
    from fusionzoo.tasks.retrieval_eval import RetrievalScores

    i2t = np.ones((1, 2))
    return RetrievalScores.checked(i2t, i2t.T, np.array([2]), np.array(pairs["caption_id"]))


def test_retrieval_needs_caption_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fusionzoo.cli import main

    assert main(["train", "task=retrieval", "data=easy-vqa", "vision=tiny", "text=tiny", "max_steps=1",
                 f"output_dir={tmp_path / 'run'}"]) == 2
    assert "needs image-caption data" in capsys.readouterr().err


def test_retrieval_training_resumes_exactly(captions_root: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Cut a run after its step-3 checkpoint and resume: the same losses and weights as straight through."""
    import shutil

    import safetensors.torch

    from fusionzoo.cli import main

    def train_log_path(run: Path) -> Path:
        return run / "train_log.jsonl"

    args = ["train", "task=retrieval", "fusion=albef", "data=karpathy-captions", f"data_dir={captions_root}",
            "vision=tiny", "text=tiny", 'fusion_kwargs={"dim": 16, "num_heads": 2, "dropout": 0.0}', "batch_size=8",
            "max_steps=6", "save_every=3", "keep_last=3", "lr=3e-3", "max_text_len=10", "log_with=none",
            "log_every=1", "max_eval_samples=0"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main([*args, f"output_dir={straight}"]) == 0
    assert main([*args, f"output_dir={cut}"]) == 0
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-00000006")
    log = train_log_path(cut)
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()
                           if json.loads(line).get("step", 0) <= 3))
    capsys.readouterr()
    assert main([*args, f"output_dir={cut}", "resume=auto"]) == 0
    said = capsys.readouterr()
    assert "resumed from" in said.out + said.err and "step-00000003" in said.out + said.err
    steps_after = [json.loads(line)["step"] for line in train_log_path(cut).read_text().splitlines()
                   if "train/loss" in json.loads(line)]
    assert steps_after == list(range(1, 7))  # 4, 5, 6 appended to the cut log: nothing retrained

    def losses(run: Path) -> dict[int, float]:
        records = [json.loads(line) for line in train_log_path(run).read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}

    assert losses(cut) == pytest.approx(losses(straight), rel=1e-6) and sorted(losses(cut)) == list(range(1, 7))
    a = safetensors.torch.load_file(str(straight / "final" / "model.safetensors"))
    b = safetensors.torch.load_file(str(cut / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _pieces(itm_signal: float, itc_signal: float, seed: int = 0) -> dict:
    """Shortlist pieces of 6 images x 12 captions (caption c belongs to image c // 2): the ITM and ITC
    scores are the match indicator times their signal plus unit noise; every pair is shortlisted."""
    g = torch.Generator().manual_seed(seed)
    match = (torch.arange(12)[None, :] // 2 == torch.arange(6)[:, None]).float()  # (I, C)
    itc = itc_signal * match + torch.randn(6, 12, generator=g)
    itm = itm_signal * match + torch.randn(6, 12, generator=g)
    short_i2t = torch.arange(12).repeat(6, 1)  # (I, C): every caption
    short_t2i = torch.arange(6).repeat(12, 1)  # (C, I): every image
    return {"itc_i2t": itc, "short_i2t": short_i2t, "short_t2i": short_t2i, "itm_i2t": itm, "itm_t2i": itm.t(),
            "logit_i2t": itc, "logit_t2i": itc.t(), "image_ids": torch.arange(6), "caption_ids": torch.arange(12),
            "owner": torch.arange(12) // 2, "itc_seconds": 0.0, "rerank_seconds": 0.0, "k": 12}


def test_the_itc_weight_is_chosen_by_r_mean() -> None:
    # an ITM head that learned nothing: the largest weight (closest to ITC alone) ranks best
    noise_itm = _pieces(itm_signal=0.0, itc_signal=3.0)
    metrics, _ = choose_ranking(noise_itm, ITC_WEIGHT_GRID)
    by_weight = {w: recall_at_k(ranked_matrices(noise_itm, w)["i2t"].numpy(), ranked_matrices(noise_itm, w)["t2i"]
                                .numpy(), noise_itm["owner"].numpy())["r_mean"] for w in ITC_WEIGHT_GRID}
    best = max(by_weight.values())
    assert metrics["r_mean"] == best and metrics["rerank_itc_weight"] == next(w for w in ITC_WEIGHT_GRID
                                                                             if by_weight[w] == best)
    assert {f"r_mean_itc_weight_{w:g}": v for w, v in by_weight.items()} == {
        k: v for k, v in metrics.items() if k.startswith("r_mean_itc_weight_")}
    assert by_weight[0.0] < by_weight[8.0]  # ITM alone is worse than (almost) ITC alone
    # a good ITM head and an ITC that ranks the wrong way round: ITM alone (weight 0) wins
    sharp_itm = _pieces(itm_signal=5.0, itc_signal=-5.0)
    assert choose_ranking(sharp_itm, ITC_WEIGHT_GRID)[0]["rerank_itc_weight"] == 0.0
    one, _ = choose_ranking(sharp_itm, [2.0])
    assert one["rerank_itc_weight"] == 2.0 and not any(k.startswith("r_mean_itc_weight_") for k in one)


def test_saved_itc_weight() -> None:
    from types import SimpleNamespace

    assert saved_itc_weight(SimpleNamespace(config={"retrieval": {"rerank_itc_weight": 4.0}})) == 4.0
    assert saved_itc_weight(SimpleNamespace(config={"task": "retrieval"})) == UNCHOSEN_ITC_WEIGHT == 1.0


def test_frozen_retrieval_runs_get_the_tasks_defaults(tmp_path: Path) -> None:
    from fusionzoo.training.config import TrainConfig, load_config

    plain = TrainConfig()
    frozen = load_config(None, ["task=retrieval"])
    assert (frozen.epochs, frozen.batch_size, frozen.lr, frozen.weight_decay) == (3.0, 64, 1e-3, 0.05)
    assert frozen.rerank_itc_weight == "auto"
    mine = load_config(None, ["task=retrieval", "lr=2e-4"])  # a key the user gives is kept
    assert (mine.lr, mine.epochs) == (2e-4, 3.0)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("task: retrieval\nbatch_size: 16\n")
    from_file = load_config(yaml_file)
    assert (from_file.batch_size, from_file.epochs) == (16, 3.0)
    tuned = load_config(None, ["task=retrieval", "freeze_encoders=false"])  # encoders train: fine-tuning's
    assert (tuned.epochs, tuned.batch_size, tuned.lr) == (plain.epochs, plain.batch_size, plain.lr)
    vqa = load_config(None, ["task=vqa"])
    assert (vqa.epochs, vqa.lr) == (plain.epochs, plain.lr)
    saved = load_config(None, [], base=TrainConfig(task="retrieval"))  # eval: the run's own config, as saved
    assert saved.lr == plain.lr
