"""Subcommands of the ``fusionzoo`` command line, one module per group.

* :mod:`~fusionzoo.commands.train` -- ``train``, ``eval``, ``predict``;
* :mod:`~fusionzoo.commands.score` -- ``score vqa``, ``score captions``;
* :mod:`~fusionzoo.commands.quantize` -- ``quantize`` and eval's / predict's ``quantize=int8``;
* :mod:`~fusionzoo.commands.demo` -- ``demo`` (the Gradio page of :mod:`fusionzoo.demo`).
"""
