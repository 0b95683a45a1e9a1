"""``python -m fusionzoo`` is the ``fusionzoo`` command (also under ``torchrun -m fusionzoo``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
