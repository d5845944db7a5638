import pytest
from apphelpers import Harness


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path / "data")
    yield h
    h.close()
