"""Shared test setup: 8 fake CPU devices (set before jax is imported) and fixture paths."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

DATA = Path(__file__).parent / "data"
TINY = DATA / "tiny"
SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
TOKENIZER = SHARED_FIXTURES / "tokenizer.model"


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """Our copy of ../shared/fixtures/tiny (release_layout, per_channel_layout, npz, manifest)."""
    return TINY


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    """The real SLNCX tokenizer; third-party data we do not commit, so skip without ../shared."""
    if not TOKENIZER.exists():
        pytest.skip("../shared/fixtures/tokenizer.model not present (not redistributed with the repo)")
    return TOKENIZER


def pytest_collection_modifyitems(config, items):
    try:
        import jax

        has_gpu = any(d.platform == "gpu" for d in jax.devices())
    except Exception:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
