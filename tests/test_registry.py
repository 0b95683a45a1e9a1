"""Registries: lookup, wildcards, loud failures, overrides, entry points, plug-in files."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fusionzoo
from fusionzoo.plugins import import_plugin
from fusionzoo.registry import Registry, RegistryError

BUILTIN_FUSIONS = [
    "albef",
    "attention_weighted",
    "co_attention",
    "early_concat",
    "late_voting",
    "merged_transformer",
]


def test_six_builtin_fusions_are_registered() -> None:
    assert set(BUILTIN_FUSIONS) <= set(fusionzoo.list_fusions())
    for name in BUILTIN_FUSIONS:
        cls = fusionzoo.FUSIONS.get(name)
        assert issubclass(cls, fusionzoo.FusionModule)
        assert cls.registry_name == name


def test_fusion_registry_name_is_its_file_name() -> None:
    # One fusion family per file, named after it: fusions/co_attention.py registers co_attention.
    for name in BUILTIN_FUSIONS:
        assert fusionzoo.FUSIONS.get(name).__module__ == f"fusionzoo.fusions.{name}"


def test_wildcards() -> None:
    assert fusionzoo.list_fusions("co_*") == ["co_attention"]
    assert fusionzoo.list_fusions("*_transformer") == ["merged_transformer"]
    assert fusionzoo.list_fusions("nothing*") == []
    assert fusionzoo.list_tasks() == ["captioning", "classification", "retrieval", "vqa"]
    assert set(fusionzoo.list_heads()) >= {"captioning", "classification", "vqa"}
    assert {"tiny", "efficientnet-lite0"} <= set(fusionzoo.list_encoders()["vision"])
    assert {"tiny", "minilm-l6"} <= set(fusionzoo.list_encoders()["text"])


def test_unknown_name_lists_what_exists_and_closest_match() -> None:
    with pytest.raises(RegistryError) as info:
        fusionzoo.FUSIONS.get("co_atention")
    message = str(info.value)
    assert "unknown fusion 'co_atention'" in message
    assert "Did you mean 'co_attention'" in message
    for name in BUILTIN_FUSIONS:
        assert name in message
    assert isinstance(info.value, KeyError)  # `except KeyError` keeps working


def test_unknown_name_without_close_match() -> None:
    with pytest.raises(RegistryError, match="Registered fusions: albef") as info:
        fusionzoo.FUSIONS.get("zzzzzz")
    assert "Did you mean" not in str(info.value)


def test_duplicate_raises_unless_override() -> None:
    reg: Registry = Registry("thing")

    @reg.register("a")
    class A:
        pass

    with pytest.raises(RegistryError, match="already registered.*override=True"):

        @reg.register("a")
        class B:
            pass

    @reg.register("a", override=True)
    class C:
        pass

    assert reg.get("a") is C
    assert reg.list() == ["a"]
    assert reg.unregister("a") is C
    assert "a" not in reg


def test_duplicate_builtin_fusion_raises() -> None:
    with pytest.raises(RegistryError, match="'early_concat' is already registered"):

        @fusionzoo.register_fusion("early_concat")
        class Impostor(fusionzoo.FusionModule):
            pass

    assert fusionzoo.FUSIONS.get("early_concat").__module__ == "fusionzoo.fusions.early_concat"


@pytest.mark.parametrize("bad", ["", "has space", "semi;colon", None])
def test_bad_names_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="name must be"):
        Registry("thing").register(bad)  # type: ignore[arg-type]


def _fake_distribution(root: Path, group: str, name: str, value: str) -> None:
    """An installed distribution on sys.path, as pip would leave it: a dist-info with entry points."""
    dist = root / "fz_plugin_demo-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fz-plugin-demo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n{name} = {value}\n")


def test_entry_point_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fz_plugin_demo.py").write_text(
        textwrap.dedent(
            """
            import fusionzoo

            class DemoFusion(fusionzoo.FusionModule):
                '''A do-nothing fusion shipped by an installed package.'''
            """
        )
    )
    _fake_distribution(tmp_path, "fusionzoo.things", "demo_fusion", "fz_plugin_demo:DemoFusion")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry = Registry("thing", "fusionzoo.things")
    assert reg.list() == ["demo_fusion"]
    assert reg.get("demo_fusion").__name__ == "DemoFusion"


def test_broken_entry_point_does_not_break_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_distribution(tmp_path, "fusionzoo.things", "broken", "no_such_module_xyz:Thing")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry = Registry("thing", "fusionzoo.things")
    assert reg.list() == []
    with pytest.raises(RegistryError, match="unknown thing 'broken'"):
        reg.get("broken")


PLUGIN_SOURCE = '''
"""A user's fusion file, outside the package."""
import torch
from torch import nn

import fusionzoo
from fusionzoo.layers import masked_mean


@fusionzoo.register_fusion("{name}")
class GatedSum(fusionzoo.FusionModule):
    """Gated sum: pooled = g * text + (1 - g) * image, g = sigmoid(w . [text; image])."""

    def __init__(self, text_dim, image_dim, *, dim=16):
        super().__init__(text_dim, image_dim, dim=dim)
        self.out_dim = dim
        self.text_proj = nn.Linear(text_dim, dim)
        self.image_proj = nn.Linear(image_dim, dim)
        self.gate = nn.Linear(2 * dim, 1)

    def forward(self, text, text_mask, image, image_mask=None, *, causal=False, cache=None):
        self.check_inputs(text, text_mask, image, image_mask)
        t = self.text_proj(text)                              # (B, T, D)
        i = masked_mean(self.image_proj(image), image_mask)   # (B, D)
        i_tok = i[:, None].expand_as(t)
        g = torch.sigmoid(self.gate(torch.cat([t, i_tok], -1)))
        tokens = g * t + (1 - g) * i_tok
        if cache is not None:
            cache.offset += text.shape[1]
        return fusionzoo.FusionOutput(text_tokens=tokens, pooled=masked_mean(tokens, text_mask))
'''


def test_plugin_file_registers_and_trains_a_step(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "my_fusion.py"
    path.write_text(PLUGIN_SOURCE.format(name="test_gated_sum"))
    try:
        import_plugin(str(path))
        assert "test_gated_sum" in fusionzoo.list_fusions()
        torch.manual_seed(0)
        model = fusionzoo.create_model("vqa", "test_gated_sum", answers=["yes", "no", "two"])
        batch = model.text.tokenize(["is it red?", "how many circles are there?"])
        pixels = torch.randn(2, 3, *model.vision.data_config["input_size"][1:])
        labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.3, 1.0]])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        before = {n: p.detach().clone() for n, p in model.fusion.named_parameters()}
        out = model(pixel_values=pixels, labels=labels, **batch)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        opt.step()
        assert all(not torch.equal(before[n], p) for n, p in model.fusion.named_parameters())
    finally:
        fusionzoo.FUSIONS.unregister("test_gated_sum")


def test_plugin_file_appears_in_cli_list(tmp_path: Path) -> None:
    path = tmp_path / "my_fusion.py"
    path.write_text(PLUGIN_SOURCE.format(name="cli_gated_sum"))
    result = subprocess.run(
        [sys.executable, "-m", "fusionzoo", "--import", str(path), "list", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    import json

    listing = json.loads(result.stdout)
    assert "cli_gated_sum" in listing["fusions"]
    assert listing["fusions"]["cli_gated_sum"].startswith("Gated sum")
    assert set(BUILTIN_FUSIONS) <= set(listing["fusions"])


def test_missing_plugin_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="plugin file .*nope.py"):
        import_plugin(str(tmp_path / "nope.py"))
