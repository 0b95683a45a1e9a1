"""A local web page for a saved model (``fusionzoo demo``): upload a photo, ask, see the answer and where the model looked.

The page is a Gradio app, an optional extra (``pip install "fusionzoo[demo]"``). Gradio is imported
only when a page is built (:func:`require_gradio`), so ``import fusionzoo`` and the command line's
``--help`` never load it. The page holds an image upload, a text box where the model's task takes a
text (a VQA question, a classification text, a retrieval caption; none for captioning) and a button.
It shows what ``fusionzoo predict`` gives for the input (answer, label, caption or match probability,
with its score as :class:`fusionzoo.tasks.Prediction` defines it) beside the figure that
``fusionzoo explain`` writes (:mod:`fusionzoo.explain_figure`), whose subtitle names how the map
was made; the method is also shown on its own.

Nothing leaves the machine: there is no share link (Gradio's ``share=True`` needs its tunnel
servers) and Gradio's analytics are off.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .errors import ConfigError, FusionZooError
from .explain_figure import explanation_png
from .tasks import get_task

#: How to install what the page needs.
INSTALL = 'pip install "fusionzoo[demo]"'


class MissingExtraError(FusionZooError, ImportError):
    """An optional extra that is not installed; the message gives the ``pip install`` that adds it."""


def require_gradio() -> Any:
    """The ``gradio`` module; :class:`MissingExtraError` when it is not installed."""
    try:
        import gradio
    except ImportError:
        raise MissingExtraError(f"fusionzoo demo needs gradio: {INSTALL}") from None
    return gradio


@dataclass
class DemoAnswer:
    """What the page shows for one input.

    Attributes:
        text: the answer, label or caption (retrieval: the match probability, as ``fusionzoo predict`` writes it).
        score: how sure the model is (:class:`fusionzoo.tasks.Prediction`); None where the task does not say.
        method: how the map was made, ``"attention rollout"`` or ``"input x gradient"``.
        figure: the image under its heat map, as ``fusionzoo explain`` draws it (RGBA).
    """

    text: str
    score: float | None
    method: str
    figure: Image.Image


def answer(model: Any, image: Image.Image, text: str | None = None, *, method: str = "auto",
           max_new_tokens: int = 20, num_beams: int = 1) -> DemoAnswer:
    """The page's output for ``image`` (and ``text`` where the task takes one).

    Args:
        model: a loaded :class:`~fusionzoo.model.FusionModel`.
        image: a PIL image (any mode).
        text: the question or text; ignored by a task that takes none (captioning).
        method: the map's method, as :func:`fusionzoo.explain.explain` takes it.
        max_new_tokens, num_beams: how a caption is generated (the same for the caption and its maps).
    Raises:
        ValueError: what :meth:`Task.predict_scored` or :func:`~fusionzoo.explain.explain` refuses
            (no text where one is needed, a method the fusion has not, an empty caption to map).
    """
    task = get_task(model.task)
    asked = text if task.needs_text else None
    decoding = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
    texts = None if asked is None else [asked]
    prediction = task.predict_scored(model, [image], texts, **decoding)[0]
    explanation = model.explain(image, asked, method=method, **decoding)
    figure = Image.open(io.BytesIO(explanation_png(explanation)))
    figure.load()
    return DemoAnswer(prediction.text, prediction.score, explanation.method, figure)


def build_demo(model: Any, *, method: str = "auto", max_new_tokens: int = 20, num_beams: int = 1,
               title: str | None = None) -> Any:
    """A ``gradio.Blocks`` page for ``model``; serve it with :func:`serve`.

    Its one endpoint, ``/answer``, takes the image (and the text where the task takes one) and returns
    ``(text, score, figure, method)``: :class:`DemoAnswer`'s fields, the figure as a PNG.

    Args:
        model: a loaded :class:`~fusionzoo.model.FusionModel` of any task :func:`~fusionzoo.tasks.get_task` knows.
        method, max_new_tokens, num_beams: as :func:`answer` takes them, for every request.
        title: the page's heading (default: the task and the fusion).
    Raises:
        MissingExtraError: gradio is not installed.
    """
    gr = require_gradio()
    task = get_task(model.task)
    fusion = model.fusion.registry_name or type(model.fusion).__name__
    heading = title or f"fusionzoo: a {model.task} model ({fusion} fusion)"

    def respond(image: Image.Image | None, text: str | None = None) -> tuple[str, float | None, Image.Image, str]:
        if image is None:
            raise gr.Error("upload a photo first")
        if task.needs_text and not (text or "").strip():
            raise gr.Error(f"type a {task.text_name} first")
        try:
            shown = answer(model, image, (text or "").strip() or None, method=method,
                           max_new_tokens=max_new_tokens, num_beams=num_beams)
        except ValueError as exc:  # an empty caption to map, a method the fusion has not, ...
            raise gr.Error(str(exc)) from exc
        return shown.text, shown.score, shown.figure, shown.method

    with gr.Blocks(title=heading, analytics_enabled=False) as page:
        gr.Markdown(f"## {heading}\n{task.description}" if getattr(task, "description", "") else f"## {heading}")
        with gr.Row():
            with gr.Column():
                inputs = [gr.Image(type="pil", image_mode="RGB", sources=["upload", "clipboard"], label="photo")]
                if task.needs_text:
                    inputs.append(gr.Textbox(label=task.text_name, lines=1, max_lines=3))
                button = gr.Button(f"get the {task.output_name}", variant="primary")
            with gr.Column():
                outputs = [
                    gr.Textbox(label=task.output_name, interactive=False),
                    gr.Number(label="score", interactive=False),
                    gr.Image(type="pil", format="png", label="where the model looks", interactive=False),
                    gr.Textbox(label="map made by", interactive=False),
                ]
        button.click(respond, inputs=inputs, outputs=outputs, api_name="answer")
        if task.needs_text:
            inputs[1].submit(respond, inputs=inputs, outputs=outputs, api_visibility="private")
    return page


def serve(page: Any, host: str = "127.0.0.1", port: int | None = None) -> str:
    """Start serving ``page`` on ``host``:``port`` (None: Gradio's 7860, or the next free port) in a
    background thread; returns the page's URL. ``page.block_thread()`` waits, ``page.close()`` stops it.

    Raises:
        ConfigError: the port is taken, or the host cannot be bound.
    """
    try:
        _, url, _ = page.queue().launch(server_name=host, server_port=port, share=False, inbrowser=False,
                                        prevent_thread_lock=True, quiet=True, show_error=True, ssr_mode=False)
    except OSError as exc:  # Gradio's "Cannot find empty port in range: ...", or the host's bind error
        where = f"{host}:{port}" if port is not None else f"{host}, ports 7860-7959"
        reason = " ".join(str(exc).split()).split(". ")[0]
        raise ConfigError(f"cannot serve the demo on {where} ({reason}): the port is taken or the address "
                          "cannot be bound; pass another --port or --host") from None
    return url
