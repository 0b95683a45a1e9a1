"""``fusionzoo.bench``'s top-level names load on first use, each from where it lives."""

from __future__ import annotations

import pytest

import fusionzoo.bench


@pytest.mark.parametrize("name", fusionzoo.bench.__all__)
def test_every_public_name_loads(name: str) -> None:
    assert getattr(fusionzoo.bench, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fusionzoo.bench.nope  # noqa: B018
