"""The public keys of users who signed requests lately, so a signed fetch or acknowledgement
costs one store call.

A user id is derived from its public key (docs/protocol.md section 2), so the key recorded
for an id never changes: what can change is whether the user still exists, and the store
call that follows every use (`IStore.remember_and_fetch`, `remember_and_acknowledge`) says
so, failing for a user that is gone, whereupon the key is forgotten. Keys enter only from
the store's own records, never from a request. Used on the reactor thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

#: Users whose keys are kept; the least recently used go first. A PEM key is about 600 bytes.
DEFAULT_SIZE = 4096


class UserKeys:
    """A bounded map of user id to public key PEM, least recently used dropped first."""

    def __init__(self, size: int = DEFAULT_SIZE):
        self.size = size
        self._keys: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, user_id: str) -> Optional[str]:
        key_pem = self._keys.get(user_id)
        if key_pem is not None:
            self._keys.move_to_end(user_id)
        return key_pem

    def remember(self, user_id: str, key_pem: str) -> None:
        """Keep the key a store record gave for `user_id`."""
        self._keys[user_id] = key_pem
        self._keys.move_to_end(user_id)
        while len(self._keys) > self.size:
            self._keys.popitem(last=False)

    def forget(self, user_id: str) -> None:
        self._keys.pop(user_id, None)
