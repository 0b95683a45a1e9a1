"""The one family of errors a user can cause, so every command catches one thing and prints one line.

Each error the zoo raises for a user's input (a configuration key, a registry name,
a data file, a checkpoint or model folder, a non-finite loss, an interrupt) derives
from :class:`FusionZooError`, and also from the built-in exception it used to be
(``ValueError``, ``KeyError``, ...) so that existing ``except`` clauses still work.
The command line prints ``fusionzoo <command>: error: <message>`` and exits with
:attr:`FusionZooError.exit_code`; ``--debug`` or ``FUSIONZOO_DEBUG=1`` shows the
traceback as well. Anything else that escapes is a bug, and keeps its traceback.

This module imports nothing, so every other module can import it.
"""

from __future__ import annotations


class FusionZooError(Exception):
    """Base of the errors a user can cause; the message says what, where and what to do.

    Attributes:
        exit_code: the command line's exit status for this error (2: bad input).
    """

    exit_code: int = 2

    def __str__(self) -> str:  # KeyError subclasses would otherwise print the message in quotes
        return str(self.args[0]) if self.args else ""


class ConfigError(FusionZooError, ValueError):
    """A configuration problem; the message names the source, the key and what was expected."""


class CheckpointError(FusionZooError, ValueError):
    """A checkpoint, run folder or model folder that cannot be used as asked (names the path and the file)."""


class ModelFolderError(CheckpointError):
    """A saved model folder whose ``config.json`` or files are not what ``load_model`` accepts."""


class MissingModelFileError(ModelFolderError, FileNotFoundError):
    """A model folder, or a file every saved model has, that is not there."""


class OutputDirError(FusionZooError, ValueError):
    """An ``output_dir`` that holds another run's checkpoints or model (nothing there is touched)."""


class QuantizedModelError(FusionZooError, RuntimeError):
    """A quantised (INT8) model asked to do what only a float model does: train, resume, leave the CPU."""


class TrainingStopped(FusionZooError, RuntimeError):
    """Training stopped early after saving a checkpoint (a non-finite loss, an interrupt)."""

    exit_code = 1


class TrainingInterrupted(TrainingStopped):
    """SIGINT or SIGTERM during training: the current step finished and a checkpoint was saved."""

    exit_code = 130
