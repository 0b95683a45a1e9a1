"""``fusionzoo demo``: the Gradio page, driven through ``gradio_client`` on a free local port.

The page's answer is the model's own (``predict``, ``generate``, ``match``) and its figure is the PNG
``fusionzoo explain`` draws, pixel for pixel; nothing of gradio loads at ``import fusionzoo``; without
gradio the command stops with one line naming the extra. Tiny random models (early_concat maps by
input x gradient, merged_transformer by attention rollout). gradio is in the dev extra.
"""

from __future__ import annotations

import io
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusionzoo.cli import main
from fusionzoo.demo import answer
from fusionzoo.explain import GRADIENT, ROLLOUT
from fusionzoo.explain_figure import explanation_png
from fusionzoo.factory import create_model

ANSWERS = ["yes", "no", "red", "blue"]
QUESTION = "is it red?"


@pytest.fixture(scope="module", autouse=True)
def _gradio_offline(tmp_path_factory: pytest.TempPathFactory):
    """No analytics, and gradio's uploads and outputs in a temporary folder (set before gradio is imported)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        yield


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(path)
    return path


def _model(task: str, fusion: str, **kwargs):
    torch.manual_seed(0)
    return create_model(task, fusion, "tiny", "tiny", pretrained=False, fusion_kwargs={"dim": 32}, **kwargs).eval()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _client(url: str, downloads: Path):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(downloads), analytics_enabled=False)


def _expected_figure(model, image: Image.Image, question: str | None, **options) -> np.ndarray:
    """The pixels of the PNG `fusionzoo explain` writes for the same input."""
    return np.asarray(Image.open(io.BytesIO(explanation_png(model.explain(image, question, **options)))))


def test_fusionzoo_and_its_cli_import_no_gradio(tmp_path: Path) -> None:
    code = ("import sys, fusionzoo, fusionzoo.cli, fusionzoo.demo; fusionzoo.cli.build_parser();"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'gradio_client')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_without_gradio_the_command_names_the_extra(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    assert main(["demo", "runs/not-there"]) == 2  # stops before it looks for the model
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert 'needs gradio: pip install "fusionzoo[demo]"' in err


def test_help_explains_the_page_and_why_no_share(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert 'pip install "fusionzoo[demo]"' in text and "There is no --share" in text and "--port" in text


def test_a_taken_port_is_a_config_error() -> None:
    from fusionzoo.demo import build_demo, serve
    from fusionzoo.errors import ConfigError

    page = build_demo(_model("retrieval", "early_concat"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve the demo on 127.0.0.1:{port} .*pass another --port"):
            serve(page, port=port)


def test_vqa_page_served_by_the_command(photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys) -> None:
    """`fusionzoo demo RUN --port N`: the page answers as model.predict does and shows explain's figure."""
    import gradio
    from gradio_client.exceptions import AppError

    model = _model("vqa", "merged_transformer", answers=ANSWERS)
    folder = model.save_pretrained(tmp_path / "vqa")
    port = _free_port()
    seen = {}

    def drive(page) -> None:  # in place of waiting for Ctrl-C: use the page, then return
        client = _client(f"http://127.0.0.1:{port}/", tmp_path / "downloads")
        seen["answer"] = client.predict(_file(photo), QUESTION, api_name="/answer")
        with pytest.raises(AppError, match="type a question first"):
            client.predict(_file(photo), "  ", api_name="/answer")

    monkeypatch.setattr(gradio.Blocks, "block_thread", drive)
    assert main(["demo", str(folder), "--port", str(port), "--device", "cpu"]) == 0
    assert f"at http://127.0.0.1:{port}/" in capsys.readouterr().err
    text, score, figure, method = seen["answer"]
    image = Image.open(photo).convert("RGB")
    assert text == model.predict([image], [QUESTION])[0]
    assert score == pytest.approx(float(model.choice_logits([image], [QUESTION]).sigmoid().max()), abs=1e-5)
    assert method == ROLLOUT
    expected = _expected_figure(model, image, QUESTION)
    assert expected.shape == (490, 400, 4)  # one 4 x 4.9 inch panel at 100 dpi
    assert np.array_equal(np.asarray(Image.open(figure)), expected)


def test_captioning_page_writes_the_generated_caption(photo: Path, tmp_path: Path) -> None:
    from fusionzoo.demo import build_demo, serve

    model = _model("captioning", "early_concat")
    page = build_demo(model, max_new_tokens=5)
    try:
        url = serve(page, port=_free_port())
        caption, score, figure, method = _client(url, tmp_path).predict(_file(photo), api_name="/answer")
    finally:
        page.close()
    image = Image.open(photo).convert("RGB")
    assert caption == model.generate([image], max_new_tokens=5)[0] and caption
    assert score == pytest.approx(float(model.decode(model.vision.preprocess([image]), max_new_tokens=5).scores[0]))
    assert method == GRADIENT
    expected = _expected_figure(model, image, None, max_new_tokens=5)  # a strip: one small map per word
    assert np.array_equal(np.asarray(Image.open(figure)), expected)


def test_retrieval_answer_is_the_match_probability(photo: Path) -> None:
    model = _model("retrieval", "early_concat")
    image = Image.open(photo).convert("RGB")
    shown = answer(model, image, "a dog on a beach")
    assert shown.score == pytest.approx(float(model.match([image], ["a dog on a beach"])[0]))
    assert shown.text == f"{shown.score:.4f}" and shown.method == GRADIENT


def _file(path: Path):
    from gradio_client import handle_file

    return handle_file(str(path))
