"""The fusion contract, checked on every registered fusion (driven by the registry).

Parametrised over ``fusionzoo.list_fusions()``, so built-in, plug-in and
entry-point fusions are all covered without anyone writing a new test. Each is
built tiny (``dim=32, num_heads=4, num_layers=1`` where its constructor takes
them, its defaults otherwise) and checked for: output shapes and ``out_dim``,
finite outputs, a JSON config that rebuilds it, use of both modalities, padding
invariance, no leak from future text positions in causal mode, incremental
decoding with a ``KVCache`` matching one full causal forward (also after
``cache.reorder`` for beam search), a finite gradient
for every parameter in both modes, clear errors on bad input shapes, and the
vote of decision-level fusions. A fusion with ``supports_head_reads`` is also
built for each kind of head and checked to compute what that head reads exactly
as when built whole, with every one of its parameters reached from that alone.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import fusionzoo
from fusionzoo import FUSIONS, FusionModule, FusionOutput, KVCache

B, T, N = 3, 7, 5
TEXT_DIM, IMAGE_DIM = 24, 20
TINY = {"dim": 32, "num_heads": 4, "num_layers": 1}
TEXT_LENGTHS = (7, 5, 2)  # right padding; position 0 is always a real token
IMAGE_LENGTHS = (5, 3, 5)
ATOL = 1e-5

# Other configurations of built-in fusions that take different code paths.
VARIANTS: dict[str, list[dict[str, object]]] = {
    "early_concat": [{"num_layers": 0}],
    "late_voting": [{"vote": "learned"}, {"vote": "poe"}],
}

# Built-in fusions that also keep ``pooled`` exact under incremental decoding
# (pooled over all positions so far) and validate the cache arguments.
STRICT_CACHE = ["attention_weighted", "co_attention", "early_concat", "late_voting", "merged_transformer"]


def _cases() -> list:
    cases = []
    for name in fusionzoo.list_fusions():
        cases.append(pytest.param(name, {}, id=name))
        for extra in VARIANTS.get(name, []):
            tag = ",".join(f"{k}={v}" for k, v in extra.items())
            cases.append(pytest.param(name, extra, id=f"{name}[{tag}]"))
    return cases


CASES = _cases()


def _head_reads_cases() -> list:
    """(name, extra, head_reads) for every case of a fusion that can be built for one kind of head."""
    return [
        pytest.param(*case.values, reads, id=f"{case.id}-{reads}")
        for case in CASES
        if FUSIONS.get(case.values[0]).supports_head_reads
        for reads in ("pooled", "text_tokens")
    ]


HEAD_READS_CASES = _head_reads_cases()


# -- helpers -------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (several times slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(name: str, extra: dict[str, object] | None = None, seed: int = 0) -> FusionModule:
    """Build a tiny instance: the TINY sizes its constructor accepts, else its defaults."""
    cls = FUSIONS.get(name)
    extra = dict(extra or {})
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in {**TINY, **extra}.items() if takes_any or k in params}
    torch.manual_seed(seed)
    try:
        return cls(text_dim=TEXT_DIM, image_dim=IMAGE_DIM, **kwargs)
    except (TypeError, ValueError):
        torch.manual_seed(seed)
        return cls(text_dim=TEXT_DIM, image_dim=IMAGE_DIM, **extra)


def lengths_mask(lengths: tuple[int, ...], size: int) -> torch.Tensor:
    """(B, size) bool mask, True for the first ``lengths[b]`` positions."""
    return torch.arange(size)[None, :] < torch.tensor(lengths)[:, None]


def make_inputs(seed: int = 0, padded: bool = True, image_padded: bool = False) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    return {
        "text": torch.randn(B, T, TEXT_DIM, generator=g),
        "text_mask": lengths_mask(TEXT_LENGTHS, T) if padded else torch.ones(B, T, dtype=torch.bool),
        "image": torch.randn(B, N, IMAGE_DIM, generator=g),
        "image_mask": lengths_mask(IMAGE_LENGTHS, N) if image_padded else None,
    }


def run(model: FusionModule, inputs: dict, **kw) -> FusionOutput:
    return model(inputs["text"], inputs["text_mask"], inputs["image"], inputs["image_mask"], **kw)


def per_position(out: FusionOutput) -> dict[str, torch.Tensor]:
    """Outputs with a text-position axis, each as (B, T, ...)."""
    found = {"text_tokens": out.text_tokens}
    if out.modality_text_tokens is not None:
        found["modality_text_tokens"] = out.modality_text_tokens.transpose(1, 2)  # (B, T, K, D)
    return found


def per_sample(out: FusionOutput) -> dict[str, torch.Tensor]:
    found = {"pooled": out.pooled}
    if out.modality_pooled is not None:
        found["modality_pooled"] = out.modality_pooled
    return found


def all_tensors(out: FusionOutput) -> dict[str, torch.Tensor]:
    found = {**per_position(out), **per_sample(out)}
    if out.image_tokens is not None:
        found["image_tokens"] = out.image_tokens
    found.update({f"aux.{k}": v for k, v in out.aux.items() if torch.is_tensor(v) and v.is_floating_point()})
    return found


def assert_close_at(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor, what: str) -> None:
    """Compare (B, T, ...) tensors at the positions where ``valid`` (B, T) is True."""
    diff = (a - b).abs()[valid].max().item()
    assert diff < ATOL, f"{what} differs by {diff:.3g} at real text positions"


# -- the contract --------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("image_padded", [False, True])
@pytest.mark.parametrize("name, extra", CASES)
def test_output_shapes_and_finite(name: str, extra: dict, image_padded: bool, causal: bool) -> None:
    model = build(name, extra).eval()
    assert isinstance(model, FusionModule)
    assert isinstance(model.out_dim, int) and model.out_dim > 0
    with torch.no_grad():
        out = run(model, make_inputs(image_padded=image_padded), causal=causal)
    assert isinstance(out, FusionOutput)
    d = model.out_dim
    assert out.text_tokens.shape == (B, T, d)
    assert out.pooled.shape == (B, d)
    if out.image_tokens is not None:
        assert out.image_tokens.dim() == 3 and out.image_tokens.shape[0] == B and out.image_tokens.shape[2] == d
    if model.decision_level:
        k = model.num_modalities
        assert out.modality_pooled is not None and out.modality_pooled.shape == (B, k, d)
        assert out.modality_text_tokens is not None and out.modality_text_tokens.shape == (B, k, T, d)
    for key, value in all_tensors(out).items():
        assert torch.isfinite(value).all(), f"{key} has NaN or inf"


@pytest.mark.parametrize("name, extra", CASES)
def test_config_is_json_and_rebuilds(name: str, extra: dict) -> None:
    model = build(name, extra).eval()
    assert isinstance(model.config, dict)
    assert "text_dim" not in model.config and "image_dim" not in model.config
    json.dumps(model.config)  # every hyperparameter must be JSON-serialisable
    rebuilt = type(model)(model.text_dim, model.image_dim, **model.config).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    inputs = make_inputs()
    with torch.no_grad():
        a, b = run(model, inputs), run(rebuilt, inputs)
    assert torch.allclose(a.pooled, b.pooled, atol=ATOL)
    assert rebuilt.out_dim == model.out_dim


@pytest.mark.parametrize("name, extra", CASES)
def test_uses_both_modalities(name: str, extra: dict) -> None:
    model = build(name, extra).eval()
    inputs = make_inputs(padded=False)
    other_image = {**inputs, "image": torch.randn(B, N, IMAGE_DIM)}
    other_text = {**inputs, "text": torch.randn(B, T, TEXT_DIM)}
    with torch.no_grad():
        base, by_image, by_text = run(model, inputs), run(model, other_image), run(model, other_text)
    for key in ("pooled", "text_tokens"):
        assert not torch.allclose(getattr(base, key), getattr(by_image, key)), f"{key} ignores the image"
        assert not torch.allclose(getattr(base, key), getattr(by_text, key)), f"{key} ignores the text"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name, extra", CASES)
def test_padding_invariance(name: str, extra: dict, causal: bool) -> None:
    model = build(name, extra).eval()
    inputs = make_inputs(image_padded=True)
    text_mask, image_mask = inputs["text_mask"], inputs["image_mask"]
    g = torch.Generator().manual_seed(1)

    # Different content at padded text and image positions.
    scrambled = dict(inputs)
    noise = 10 * torch.randn(B, T, TEXT_DIM, generator=g)
    scrambled["text"] = torch.where(text_mask[..., None], inputs["text"], noise)
    noise = 10 * torch.randn(B, N, IMAGE_DIM, generator=g)
    scrambled["image"] = torch.where(image_mask[..., None], inputs["image"], noise)

    # Three extra padded text positions at the end.
    extra_pad = 3
    longer = dict(inputs)
    longer["text"] = torch.cat([inputs["text"], torch.randn(B, extra_pad, TEXT_DIM, generator=g)], dim=1)
    longer["text_mask"] = torch.cat([text_mask, torch.zeros(B, extra_pad, dtype=torch.bool)], dim=1)

    with torch.no_grad():
        ref, alt, long = (run(model, x, causal=causal) for x in (inputs, scrambled, longer))
    for other, how in ((alt, "changing padded content"), (long, "appending padding")):
        for key, value in per_position(ref).items():
            assert_close_at(value, per_position(other)[key][:, :T], text_mask, f"{key} after {how}")
        for key, value in per_sample(ref).items():
            diff = (value - per_sample(other)[key]).abs().max().item()
            assert diff < ATOL, f"{key} changes by {diff:.3g} after {how}"


@pytest.mark.parametrize("name, extra", CASES)
def test_causal_has_no_future_leak(name: str, extra: dict) -> None:
    model = build(name, extra).eval()
    inputs = make_inputs(padded=False)
    with torch.no_grad():
        ref = per_position(run(model, inputs, causal=True))
        for t in (1, 3, T - 1):
            changed = dict(inputs)
            changed["text"] = inputs["text"].clone()
            changed["text"][:, t:] = torch.randn(B, T - t, TEXT_DIM)
            out = per_position(run(model, changed, causal=True))
            for key, value in ref.items():
                before = (value[:, :t] - out[key][:, :t]).abs().max().item()
                assert before < ATOL, f"{key} at positions < {t} moves by {before:.3g} when positions >= {t} change"
                after = (value[:, t:] - out[key][:, t:]).abs().max().item()
                assert after > 1e-4, f"{key} at positions >= {t} ignores its own text (the test cannot fail)"


@pytest.mark.parametrize("first_chunk", [1, 3])
@pytest.mark.parametrize("name, extra", CASES)
def test_cache_matches_full_causal_forward(name: str, extra: dict, first_chunk: int) -> None:
    model = build(name, extra).eval()
    inputs = make_inputs(image_padded=True)
    inputs["text_mask"] = lengths_mask((7, 5, 6), T)  # captions of different lengths
    text, text_mask = inputs["text"], inputs["text_mask"]
    with torch.no_grad():
        full = per_position(run(model, inputs, causal=True))
        cache = KVCache()
        steps: list[dict[str, torch.Tensor]] = []
        bounds = [0, first_chunk, *range(first_chunk + 1, T + 1)]
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            step = {**inputs, "text": text[:, start:stop], "text_mask": text_mask[:, :stop]}
            out = per_position(run(model, step, causal=True, cache=cache))
            assert out["text_tokens"].shape[1] == stop - start, "with a cache, text_tokens holds the new positions only"
            assert cache.offset == stop, f"cache.offset should be {stop} after this step, got {cache.offset}"
            steps.append(out)
    for key, value in full.items():
        incremental = torch.cat([s[key] for s in steps], dim=1)
        assert_close_at(incremental, value, text_mask, f"{key} decoded with a cache")


@pytest.mark.parametrize("name, extra", CASES)
def test_cache_reorder_for_beam_search(name: str, extra: dict) -> None:
    """After ``cache.reorder(index)`` decoding goes on as if the batch had been ``x[index]``."""
    model = build(name, extra).eval()
    inputs = make_inputs(padded=False, image_padded=True)
    index = torch.tensor([2, 0, 0])
    chosen = {k: (v[index] if v is not None else None) for k, v in inputs.items()}
    start = 3
    with torch.no_grad():
        full = per_position(run(model, chosen, causal=True))
        cache = KVCache()
        prompt = {**inputs, "text": inputs["text"][:, :start], "text_mask": inputs["text_mask"][:, :start]}
        run(model, prompt, causal=True, cache=cache)
        cache.reorder(index)
        steps = []
        for t in range(start, T):
            step = {**chosen, "text": chosen["text"][:, t : t + 1], "text_mask": chosen["text_mask"][:, : t + 1]}
            steps.append(per_position(run(model, step, causal=True, cache=cache)))
    for key, value in full.items():
        diff = (torch.cat([s[key] for s in steps], dim=1) - value[:, start:]).abs().max().item()
        assert diff < ATOL, f"{key} after cache.reorder differs by {diff:.3g}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name, extra", CASES)
def test_every_parameter_gets_a_gradient(name: str, extra: dict, causal: bool) -> None:
    model = build(name, extra).train()
    out = run(model, make_inputs(image_padded=True), causal=causal)
    torch.manual_seed(2)
    # A random projection of every output: a plain sum would be blind to anything
    # before a LayerNorm (the sum of a normalised vector is constant).
    loss = sum((value * torch.randn_like(value)).sum() for value in all_tensors(out).values())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters with no gradient (causal={causal}): {missing}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"parameters with NaN/inf gradients (causal={causal}): {bad}"


@pytest.mark.parametrize("name", fusionzoo.list_fusions())
def test_bad_input_shapes_are_clear_errors(name: str) -> None:
    model = build(name).eval()
    x = make_inputs(image_padded=True)
    text, text_mask, image, image_mask = x["text"], x["text_mask"], x["image"], x["image_mask"]
    bad_calls = {
        "2-D text": (text[0], text_mask, image, image_mask),
        "2-D image": (text, text_mask, image[0], image_mask),
        "batch sizes differ": (text, text_mask, image[:2], None),
        "text_mask batch": (text, text_mask[:2], image, image_mask),
        "image_mask shape": (text, text_mask, image, image_mask[:, :2]),
    }
    for what, args in bad_calls.items():
        try:
            model(*args)
        except ValueError:
            continue
        pytest.fail(f"{name} accepted bad input ({what}) instead of raising ValueError")


@pytest.mark.parametrize("name, extra", CASES)
def test_vote(name: str, extra: dict) -> None:
    model = build(name, extra).eval()
    if not model.decision_level:
        with pytest.raises(TypeError):
            model.vote(torch.randn(B, 2, 4))
        return
    k, c = model.num_modalities, 6
    for activation in ("softmax", "sigmoid"):
        pooled_logits = torch.randn(B, k, c)
        token_logits = torch.randn(B, k, T, c)
        combined = model.vote(pooled_logits, activation)
        assert combined.shape == (B, c)
        assert model.vote(token_logits, activation).shape == (B, T, c)
        assert torch.isfinite(combined).all()


@pytest.mark.parametrize("name", STRICT_CACHE)
def test_builtin_pooled_follows_the_cache(name: str) -> None:
    """Step by step, ``pooled`` equals the full causal forward over the positions so far."""
    model = build(name).eval()
    inputs = make_inputs(image_padded=True)
    cache = KVCache()
    with torch.no_grad():
        for stop in range(1, T + 1):
            step = {**inputs, "text": inputs["text"][:, stop - 1 : stop], "text_mask": inputs["text_mask"][:, :stop]}
            prefix = {**inputs, "text": inputs["text"][:, :stop], "text_mask": inputs["text_mask"][:, :stop]}
            got = run(model, step, causal=True, cache=cache)
            want = run(model, prefix, causal=True)
            for key, value in per_sample(want).items():
                diff = (per_sample(got)[key] - value).abs().max().item()
                assert diff < ATOL, f"{key} after {stop} cached positions differs by {diff:.3g}"


@pytest.mark.parametrize("name", STRICT_CACHE)
def test_builtin_cache_arguments_are_checked(name: str) -> None:
    model = build(name).eval()
    x = make_inputs()
    with pytest.raises(ValueError, match="causal=True"):
        model(x["text"], x["text_mask"], x["image"], cache=KVCache())
    with pytest.raises(ValueError, match="text_mask must cover"):
        model(x["text"], x["text_mask"][:, :3], x["image"])
    cache = KVCache()
    model(x["text"][:, :2], x["text_mask"][:, :2], x["image"], causal=True, cache=cache)
    with pytest.raises(ValueError, match="2 cached"):
        model(x["text"][:, 2:3], x["text_mask"][:, :2], x["image"], causal=True, cache=cache)


# -- built for one kind of head (``head_reads``) ---------------------------------------------


def read_by(head_reads: str, out: FusionOutput) -> dict[str, torch.Tensor]:
    """The outputs a head that reads ``head_reads`` sees."""
    return per_sample(out) if head_reads == "pooled" else per_position(out)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name, extra, head_reads", HEAD_READS_CASES)
def test_built_for_one_head_it_keeps_only_what_that_head_reads(
    name: str, extra: dict, head_reads: str, causal: bool
) -> None:
    whole = build(name, extra).eval()
    part = build(name, {**extra, "head_reads": head_reads}).eval()
    assert part.config["head_reads"] == head_reads
    rebuilt = type(part)(part.text_dim, part.image_dim, **json.loads(json.dumps(part.config)))
    assert list(rebuilt.state_dict()) == list(part.state_dict()), "the config rebuilds the same parts"

    # Its parameters are some of the whole fusion's; with their values it computes what the head reads exactly.
    whole_state, own = whole.state_dict(), part.state_dict()
    extra_names = sorted(set(own) - set(whole_state))
    assert not extra_names, f"parameters the whole fusion does not have: {extra_names}"
    part.load_state_dict({k: whole_state[k] for k in own}, strict=True)
    inputs = make_inputs(image_padded=True)
    with torch.no_grad():
        want, got = run(whole, inputs, causal=causal), run(part, inputs, causal=causal)
    for key, value in read_by(head_reads, want).items():
        assert torch.equal(read_by(head_reads, got)[key], value), f"{key} differs from the whole fusion's"
    # What the head does not read keeps the contract's shapes (image_tokens may be None).
    for key, value in all_tensors(got).items():
        assert torch.isfinite(value).all(), f"{key} has NaN or inf"
    assert got.text_tokens.shape == (B, T, part.out_dim) and got.pooled.shape == (B, part.out_dim)

    # Every parameter it has gets a gradient from what the head reads alone.
    part.train()
    out = run(part, inputs, causal=causal)
    torch.manual_seed(2)
    loss = sum((value * torch.randn_like(value)).sum() for value in read_by(head_reads, out).values())
    loss.backward()
    missing = [n for n, p in part.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"built for a head that reads {head_reads}, these get no gradient from it: {missing}"


@pytest.mark.parametrize("name, extra, head_reads", HEAD_READS_CASES)
def test_built_for_one_head_it_decodes_with_a_cache(name: str, extra: dict, head_reads: str) -> None:
    model = build(name, {**extra, "head_reads": head_reads}).eval()
    inputs = make_inputs(image_padded=True)
    text, text_mask = inputs["text"], inputs["text_mask"]
    with torch.no_grad():
        full = run(model, inputs, causal=True)
        cache = KVCache()
        steps = [run(model, {**inputs, "text": text[:, t : t + 1], "text_mask": text_mask[:, : t + 1]},
                     causal=True, cache=cache) for t in range(T)]
    for key, value in per_position(full).items():
        incremental = torch.cat([per_position(s)[key] for s in steps], dim=1)
        assert_close_at(incremental, value, text_mask, f"{key} decoded with a cache")
    for key, value in per_sample(full).items():
        diff = (per_sample(steps[-1])[key] - value).abs().max().item()
        assert diff < ATOL, f"{key} after the last cached step differs by {diff:.3g}"


@pytest.mark.parametrize("name", [n for n in fusionzoo.list_fusions() if FUSIONS.get(n).supports_head_reads])
def test_an_unknown_head_reads_is_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match="head_reads must be one of"):
        build(name, {"head_reads": "both"})
