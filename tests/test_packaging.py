"""kvlab's top-level package names against those of its dependencies."""
from __future__ import annotations

import pytest


def test_hub_kernels_names_say_which_transformers_kvlab_needs():
    """transformers >= 5.25 imports Hugging Face's `kernels`, whose import name is kvlab's
    `kernels`: importing one of its names says so and names the fix; other names are plain
    attribute errors (``hasattr`` still works)."""
    import kernels

    with pytest.raises(ImportError, match=r"pip install 'transformers<5.25'"):
        from kernels import CUDAProperties  # noqa: F401
    assert not hasattr(kernels, "no_such_kernel") and callable(kernels.attention)
