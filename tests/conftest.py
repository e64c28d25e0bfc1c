"""Shared fixtures: the real tiny model (stories260K) from the read-only shared folder.

The shared root is ``<repo>/../shared`` (``/work/shared`` here); set
``TTQ_SHARED_DIR`` to point elsewhere.  Tests that need it skip when it is missing.
Torch runs single-threaded in tests (``TTQ_TEST_THREADS`` overrides).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Tests use tiny tensors: one intra-op thread is faster (no spin-waiting on a busy 2-core box)
    and deterministic.  ``TTQ_TEST_THREADS=n`` overrides."""
    torch.set_num_threads(int(os.environ.get("TTQ_TEST_THREADS", "1")))


def shared_dir() -> Path:
    """Root of the shared read-only data (models/, data/)."""
    env = os.environ.get("TTQ_SHARED_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """Folder of the stories260K Llama checkpoint (HF format); skips if absent."""
    path = shared_dir() / "models" / "stories260K"
    if not (path / "config.json").is_file():
        pytest.skip(f"stories260K not found at {path} (set TTQ_SHARED_DIR to the shared root)")
    return path


@pytest.fixture(scope="session")
def stories_tokenizer(stories_dir: Path):
    """The stories260K tokenizer (read-only: shared by the whole session)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories_dir)


@pytest.fixture()
def stories_model(stories_dir: Path) -> torch.nn.Module:
    """A fresh float32 stories260K model in eval mode (function scope: tests may patch it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
