"""The profile folder: our key, the pinned relay, contacts, and durable file writes.

Layout (docs/client.md describes it for people):

    <root>/<name>/            0700
        config.json           relay URL, relay name, pinned relay fingerprint, our user id
        key.pem               private key, 0600, PKCS#8, optionally passphrase-encrypted
        contacts.json         contacts with pinned keys, tokens and conversation state
        outbox/               packets not yet accepted by the relay (outbox.py)
        inbox/                one JSON file per received message (inbox.py)
        rejected/             messages that failed checks, kept for inspection
        files/                received files (type 1), unless --output-dir says otherwise
        lock                  serialises read-modify-write of the JSON files

Every file is written to a temporary name, fsynced and renamed, so a crash leaves either
the old or the new version and a fetched message is on disk before it is acknowledged.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from cryptography.hazmat.primitives.asymmetric import rsa

from ..durable import create_durably, replace_durably
from ..wire.addresses import parse_address
from ..wire.dates import format_date
from ..wire.errors import ProtocolError
from ..wire.keys import fingerprint, load_public_key, public_key_pem
from .errors import ProfileError, UsageError
from .identity import Identity, pem_is_encrypted, private_key_from_pem, private_key_to_pem

PROFILE_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
CONTACT_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
DEFAULT_PROFILE = "default"
#: How many recent message references a contact keeps, to tell a gap from a crossed message.
RECENT_REFS = 200


def default_root() -> Path:
    """`$XDG_CONFIG_HOME/msgrelay`, or `~/.config/msgrelay` when it is unset."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "msgrelay"


def json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


def read_json(path: Path, default: Any = None) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return default
    except OSError as e:
        raise ProfileError(f"cannot read {path}: {e}")
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ProfileError(f"{path} is corrupt: {e}")


def check_contact_name(name: str) -> str:
    if not CONTACT_NAME_RE.fullmatch(name):
        raise UsageError(f"contact name {name!r} must be 1-64 characters of letters, digits, '.', '_' and '-'")
    return name


@dataclass
class Contact:
    """Someone we can write to or have heard from, with their key pinned on first use."""

    name: str
    address: str  # qualified address
    key_pem: str
    fingerprint: str
    token: Optional[str] = None  # the access token they minted for us (from their invite or type 3)
    relay_url: Optional[str] = None  # where to look their key up, when not https://<server_name>
    my_token_id: Optional[str] = None  # id of the token we minted for them (sent in a type 3)
    my_token: Optional[str] = None  # that token, to send it again if the first type 3 was refused
    intro_sent: bool = False  # a type 3 token request has been queued for them
    has_written: bool = False  # they wrote to us, so they already hold a token of ours
    last_id: Optional[str] = None  # reference of the last message of the conversation
    recent_refs: list[str] = field(default_factory=list)
    added: str = ""

    @property
    def user_id(self) -> str:
        return self.address.partition("@")[0]

    @property
    def server_name(self) -> str:
        return self.address.partition("@")[2]

    def public_key(self) -> rsa.RSAPublicKey:
        try:
            return load_public_key(self.key_pem)
        except ProtocolError as e:
            raise ProfileError(f"the pinned key of contact {self.name} is corrupt: {e.message}")

    def remember(self, ref: str) -> None:
        """Make `ref` the conversation's latest message."""
        self.last_id = ref
        self.recent_refs = (self.recent_refs + [ref])[-RECENT_REFS:]

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Contact":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in obj.items() if k in known})


class Profile:
    """One identity at one relay, stored in one folder."""

    def __init__(self, path: Path, name: str = DEFAULT_PROFILE):
        self.path = Path(path)
        self.name = name

    @classmethod
    def locate(cls, name: Optional[str] = None, root: Optional[Path] = None) -> "Profile":
        name = name or DEFAULT_PROFILE
        if not PROFILE_NAME_RE.fullmatch(name):
            raise UsageError(f"profile name {name!r} must be 1-64 characters of letters, digits, '.', '_' and '-'")
        return cls((root or default_root()) / name, name)

    # -- folders -----------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def key_path(self) -> Path:
        return self.path / "key.pem"

    @property
    def contacts_path(self) -> Path:
        return self.path / "contacts.json"

    def folder(self, name: str) -> Path:
        """A subfolder (outbox, inbox, rejected, files), created 0700 on first use."""
        path = self.path / name
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def exists(self) -> bool:
        return self.config_path.exists()

    def create_folder(self) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the profile lock, so that a `fetch --watch` and a `send` do not lose updates."""
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # -- config ------------------------------------------------------------------------

    def load_config(self) -> dict[str, Any]:
        config = read_json(self.config_path)
        if config is None:
            raise UsageError(
                f"no profile {self.name!r} at {self.path}; create it with: msgrelay-client"
                f"{'' if self.name == DEFAULT_PROFILE else ' --profile ' + self.name} init --server URL"
            )
        for key in ("server_url", "server_name", "server_fingerprint", "user_id"):
            if not isinstance(config.get(key), str):
                raise ProfileError(f"{self.config_path} has no {key}")
        return config

    def save_config(self, config: dict[str, Any]) -> None:
        replace_durably(self.config_path, json_bytes(config))

    def update_config(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        with self.locked():
            config = self.load_config()
            change(config)
            self.save_config(config)
        return config

    # -- key ---------------------------------------------------------------------------

    def has_key(self) -> bool:
        return self.key_path.exists()

    def write_key(self, key: rsa.RSAPrivateKey, passphrase: Optional[bytes] = None) -> None:
        create_durably(self.key_path, private_key_to_pem(key, passphrase), 0o600)

    def write_key_pem(self, pem: bytes) -> None:
        """An imported key file, kept as it is (encrypted or not), 0600."""
        create_durably(self.key_path, pem, 0o600)

    def key_pem(self) -> bytes:
        """The key file's bytes, refusing a file others can read (as ssh does)."""
        try:
            mode = stat.S_IMODE(os.stat(self.key_path).st_mode)
            if mode & 0o077:
                raise ProfileError(f"{self.key_path} is accessible by others (mode {mode:04o}); run: chmod 600 {self.key_path}")
            return self.key_path.read_bytes()
        except FileNotFoundError:
            raise ProfileError(f"{self.key_path} is missing: this profile has no private key")
        except OSError as e:
            raise ProfileError(f"cannot read {self.key_path}: {e}")

    def load_private_key(self, passphrase: Callable[[], Optional[bytes]]) -> rsa.RSAPrivateKey:
        """`passphrase` is asked only when the key is encrypted. The key was checked in full
        when it was made or imported (`init --key`), so it is not checked again on every command."""
        pem = self.key_pem()
        return private_key_from_pem(pem, passphrase() if pem_is_encrypted(pem) else None, checked=False)

    def load_identity(self, passphrase: Callable[[], Optional[bytes]]) -> Identity:
        config = self.load_config()
        identity = Identity(self.load_private_key(passphrase), config["server_name"])
        if identity.user_id != config["user_id"]:
            raise ProfileError(f"{self.key_path} does not belong to user {config['user_id']} of {self.config_path}")
        return identity

    # -- contacts ----------------------------------------------------------------------

    def load_contacts(self) -> dict[str, Contact]:
        obj = read_json(self.contacts_path, {"contacts": {}})
        try:
            return {name: Contact.from_json(entry) for name, entry in obj["contacts"].items()}
        except (KeyError, TypeError, AttributeError) as e:
            raise ProfileError(f"{self.contacts_path} is corrupt: {e}")

    def save_contacts(self, contacts: dict[str, Contact]) -> None:
        replace_durably(self.contacts_path, json_bytes({"contacts": {n: asdict(c) for n, c in sorted(contacts.items())}}))

    @contextlib.contextmanager
    def editing_contacts(self) -> Iterator[dict[str, Contact]]:
        """Load, let the caller change, and save the contacts under the profile lock."""
        with self.locked():
            contacts = self.load_contacts()
            yield contacts
            self.save_contacts(contacts)

    def contact(self, name: str) -> Contact:
        contacts = self.load_contacts()
        if name not in contacts:
            known = ", ".join(sorted(contacts)) or "none yet"
            raise UsageError(f"no contact named {name!r} (contacts: {known})")
        return contacts[name]


def find_by_user_id(contacts: dict[str, Contact], user_id: str) -> Optional[Contact]:
    return next((c for c in contacts.values() if c.user_id == user_id), None)


def new_contact(name: str, address: str, key: rsa.RSAPublicKey, **fields: Any) -> Contact:
    """A contact whose key is pinned now (trust on first use)."""
    parsed = parse_address(address)
    return Contact(
        name=check_contact_name(name),
        address=str(parsed),
        key_pem=public_key_pem(key),
        fingerprint=fingerprint(key),
        added=format_date(time.time()),
        **fields,
    )
