"""Shared fixtures: one tiny model trained once per test session."""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_config():
    """configs/tiny.py (synthetic reverse task), a fresh ConfigDict for each test."""
    from configs import tiny
    return tiny.get_config()


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
    """A workdir holding a finished configs/tiny.py run (about 25 s on 2 CPU cores)."""
    from configs import tiny
    from s2s_jax import training
    workdir = str(tmp_path_factory.mktemp("tiny"))
    training.train_and_evaluate(tiny.get_config(), workdir)
    return workdir
