import pytest

from streamtune import compat


@pytest.fixture(autouse=True)
def _no_fix_leaks():
    """Every test starts and ends with no compat fix applied."""
    compat.revert()
    yield
    compat.revert()
