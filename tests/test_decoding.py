"""Decoding options: the score processors against transformers' logits processors, and generation with them
on a tiny random captioning model against a greedy loop written here over the model's full forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from fusionzoo.decoding import DecodingOptions, ban_repeated_ngrams, penalize_repetitions, process_scores
from fusionzoo.errors import ConfigError
from fusionzoo.factory import create_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("captioning", "early_concat", "tiny", "tiny", pretrained=False, fusion_kwargs={"dim": 32}).eval()


@pytest.fixture(scope="module")
def pixels(model):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    return model.vision.preprocess(images)


def _random_case(seed: int, rows: int = 5, length: int = 9, vocab: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (rows, length), generator=generator)  # few distinct tokens: n-grams repeat
    return ids, torch.randn(rows, vocab, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
def test_processors_equal_transformers(seed: int) -> None:
    ids, scores = _random_case(seed)
    for penalty in (0.5, 1.0, 1.7):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores.clone())
        assert torch.equal(penalize_repetitions(ids, scores, penalty), expected)
    for n in (1, 2, 3, 9, 10):
        expected = NoRepeatNGramLogitsProcessor(n)(ids, scores.clone())
        assert torch.equal(ban_repeated_ngrams(ids, scores, n), expected), n
    options = DecodingOptions(max_new_tokens=20, min_new_tokens=10, no_repeat_ngram_size=2, repetition_penalty=1.3)
    eos = 3
    reference = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(2),
                                     MinNewTokensLengthLogitsProcessor(1, 10, eos)])
    # ids hold the start token and 8 written tokens: fewer than 10, so EOS is banned too
    assert torch.equal(process_scores(ids, scores, options, ids.shape[1] - 1, eos), reference(ids, scores.clone()))
    length_only = DecodingOptions(max_new_tokens=20, min_new_tokens=8)
    assert torch.isinf(process_scores(ids, scores, length_only, 7, eos)[:, eos]).all()
    assert torch.equal(process_scores(ids, scores, length_only, 8, eos), scores)


def _greedy_reference(model, pixels, options: DecodingOptions, processors: LogitsProcessorList) -> tuple:
    """Greedy decoding over the model's forward pass (whole prefix each step), transformers' processors on the
    logits; returns the ids and each caption's mean log-probability of its tokens (processed, up to EOS)."""
    bos, eos, pad = model.text.bos_token_id, model.text.eos_token_id, model.text.pad_token_id
    ids = torch.full((len(pixels), 1), bos, dtype=torch.long)
    done = torch.zeros(len(pixels), dtype=torch.bool)
    total, count = torch.zeros(len(pixels), dtype=torch.float64), torch.zeros(len(pixels))
    with torch.no_grad():
        for _ in range(options.max_new_tokens):
            logits = model(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
            processed = processors(ids, logits.double())
            token = processed.argmax(-1)
            step = processed.log_softmax(-1).gather(1, token[:, None])[:, 0]
            total += torch.where(done, 0.0, step)
            count += (~done).float()
            token = torch.where(done, torch.full_like(token, pad), token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            done |= token == eos
            if done.all():
                break
    return ids, total / count


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_with_options_equals_transformers_processors(model, pixels, use_cache: bool) -> None:
    eos = model.text.eos_token_id
    for options, processors in [
        (DecodingOptions(max_new_tokens=8), []),
        (DecodingOptions(max_new_tokens=8, repetition_penalty=2.5), [RepetitionPenaltyLogitsProcessor(2.5)]),
        (DecodingOptions(max_new_tokens=8, no_repeat_ngram_size=1), [NoRepeatNGramLogitsProcessor(1)]),
        (DecodingOptions(max_new_tokens=8, min_new_tokens=6, no_repeat_ngram_size=2, repetition_penalty=0.7),
         [RepetitionPenaltyLogitsProcessor(0.7), NoRepeatNGramLogitsProcessor(2),
          MinNewTokensLengthLogitsProcessor(1, 6, eos)]),
    ]:
        expected, expected_scores = _greedy_reference(model, pixels, options, LogitsProcessorList(processors))
        decoded = model.decode(pixels, use_cache=use_cache, **options.kwargs())
        assert torch.equal(decoded.ids, expected), options
        assert decoded.scores == pytest.approx(expected_scores.tolist(), abs=1e-6), options


def test_plain_greedy_repeats_so_the_options_are_tested(model, pixels) -> None:
    ids = model.generate_ids(pixels, max_new_tokens=8)
    assert any(len(set(row)) < len(row) for row in ids[:, 1:].tolist())  # the random model repeats tokens


def _caption_tokens(row: list[int], eos: int) -> list[int]:
    """The tokens after the start token, up to and without the first EOS."""
    row = row[1:]
    return row[:row.index(eos)] if eos in row else row


def test_beam_search_options(model, pixels) -> None:
    eos = model.text.eos_token_id
    for beams in (1, 3):
        rows = model.generate_ids(pixels, max_new_tokens=8, num_beams=beams, no_repeat_ngram_size=1).tolist()
        for row in rows:
            written = row[:1] + _caption_tokens(row, eos)
            assert len(set(written)) == len(written), (beams, row)  # no token twice, the start token included
        rows = model.generate_ids(pixels, max_new_tokens=7, min_new_tokens=7, num_beams=beams).tolist()
        assert all(len(_caption_tokens(row, eos)) == 7 and eos not in row for row in rows)
        pairs = model.generate_ids(pixels, max_new_tokens=8, num_beams=beams, no_repeat_ngram_size=2).tolist()
        for row in pairs:
            written = row[:1] + _caption_tokens(row, eos)
            bigrams = list(zip(written, written[1:]))
            assert len(set(bigrams)) == len(bigrams), (beams, row)


def test_beam_scores_are_the_ranked_scores(model, pixels) -> None:
    """The best beam's score is its summed log-probability over length ** length_penalty."""
    eos, pad = model.text.eos_token_id, model.text.pad_token_id
    for penalty in (0.0, 1.0, 2.0):
        decoded = model.decode(pixels, max_new_tokens=5, num_beams=3, length_penalty=penalty)
        ids = decoded.ids
        with torch.no_grad():
            logits = model(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        lp = logits[:, :-1].double().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, L)
        written = torch.tensor([len(_caption_tokens(row, eos)) + (eos in row) for row in ids.tolist()])
        keep = torch.arange(lp.shape[1])[None] < written[:, None]
        expected = (lp * keep).sum(-1) / written.double() ** penalty
        assert decoded.scores == pytest.approx(expected.tolist(), abs=1e-5), penalty
        assert all(t == pad for row, n in zip(ids.tolist(), written.tolist()) for t in row[1 + n:])


@pytest.mark.parametrize("kwargs, message", [
    ({"num_beams": 0}, "key 'num_beams' must be an integer >= 1, got 0"),
    ({"max_new_tokens": 2.5}, "key 'max_new_tokens' must be an integer >= 1, got 2.5"),
    ({"min_new_tokens": 5, "max_new_tokens": 4}, "key 'min_new_tokens' \\(5\\) must not exceed max_new_tokens \\(4\\)"),
    ({"no_repeat_ngram_size": -1}, "key 'no_repeat_ngram_size' must be an integer >= 0, got -1"),
    ({"repetition_penalty": 0.0}, "key 'repetition_penalty' must be > 0 \\(1.0: no penalty\\), got 0.0"),
])
def test_bad_options_name_the_key(model, pixels, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DecodingOptions(**kwargs)
    with pytest.raises(ConfigError, match=message):
        model.generate_ids(pixels, **kwargs)


def test_run_config_keys_are_the_options() -> None:
    """``fusionzoo train / eval`` keys of the same names: the same defaults, checked when the config is read."""
    from fusionzoo.training.config import TrainConfig, load_config

    assert DecodingOptions.from_config(TrainConfig()) == DecodingOptions()
    config = load_config(None, ["num_beams=4", "length_penalty=0.6", "no_repeat_ngram_size=3", "min_new_tokens=2",
                                "max_new_tokens=12", "repetition_penalty=1.2"])
    assert DecodingOptions.from_config(config) == DecodingOptions(4, 12, 2, 0.6, 3, 1.2)
    with pytest.raises(ConfigError, match="key 'min_new_tokens' \\(30\\) must not exceed max_new_tokens \\(20\\)"):
        load_config(None, ["min_new_tokens=30"])
