"""The maildir store: the shared contract plus what only a filesystem backend can show."""

from __future__ import annotations

import pytest

from msgrelay.store.maildir import MaildirStore
from store_contract import StoreContract


class TestMaildirStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        return MaildirStore(tmp_path / "state")
