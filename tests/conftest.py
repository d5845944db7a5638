"""Shared fixtures: one SIGNAL_HOME (built-in models built once) per test session."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

_HOME = Path(tempfile.mkdtemp(prefix="signal-test-home-"))
os.environ["SIGNAL_HOME"] = str(_HOME)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from rewardsignal.models import resolve_model_path

    return resolve_model_path("signal-tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from rewardsignal.models import load_tokenizer

    return load_tokenizer("signal-tiny")


@pytest.fixture(scope="session")
def tiny_spec():
    from rewardsignal.lora import LoraSpec
    from rewardsignal.models import model_info

    return LoraSpec(r=4, alpha=8.0, target_modules=model_info("signal-tiny").default_target_modules,
                    seed=0)
