import pytest


@pytest.fixture(autouse=True)
def _own_digest_cache(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's digest cache (lorabox/io/digests.py); each test starts with none."""
    monkeypatch.setenv("LORABOX_CACHE_DIR", str(tmp_path_factory.mktemp("lorabox-cache")))
