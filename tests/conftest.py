"""Fixtures shared by the test modules."""
import pytest


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """An untrained digits pipeline saved to disk (the bundled architecture; no training needed)."""
    from compactfusion.bundled.digits import build_digits_pipeline, save_digits_pipeline
    d = tmp_path_factory.mktemp("digits")
    save_digits_pipeline(build_digits_pipeline(0), d)
    return str(d)
