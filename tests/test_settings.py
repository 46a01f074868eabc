"""Settings: the example config documents every setting with its default, and bad values are named."""

import tomllib
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from msgrelay.settings import SETTINGS, SettingError, read_toml, resolve

EXAMPLE = Path(__file__).parent.parent / "etc" / "msgrelay.toml"


def test_example_config_names_every_setting_with_its_default():
    text = EXAMPLE.read_text()
    parsed = tomllib.loads(text)
    for setting in SETTINGS:
        if setting.name == "server.name":  # its default is the host name, so it is shown commented out
            assert "\n# name = " in text
            continue
        assert setting.key in parsed.get(setting.section, {}), f"{setting.name} missing from etc/msgrelay.toml"
        assert parsed[setting.section][setting.key] == setting.default, setting.name


def test_example_config_loads_as_is():
    settings = resolve(read_toml(str(EXAMPLE)), {"server.name": "relay.example.org"})
    assert settings.limits.max_ttl == 2592000
    assert settings.server.listen == ("tcp:8080:interface=127.0.0.1",)


def test_every_setting_has_exactly_one_typed_field():
    """SETTINGS and the frozen section dataclasses agree (import also fails if they do not)."""
    from msgrelay.settings import Settings, table_mismatches

    assert table_mismatches() == []
    settings = resolve({}, {"server.name": "relay.test"})
    assert set(settings.values) == {s.name for s in SETTINGS}
    assert all(settings.get(s.name) == (tuple(s.default) if s.kind is list else s.default)
               for s in SETTINGS if s.name != "server.name")
    with pytest.raises(FrozenInstanceError):
        settings.limits.max_ttl = 1
    assert Settings.from_values(settings.values) == settings


def test_a_row_without_a_field_is_caught(monkeypatch):
    from msgrelay import settings as module

    monkeypatch.setattr(module, "SETTINGS", [*module.SETTINGS, module.Setting("limits", "new_one", int, 1)])
    assert module.table_mismatches() == ["limits.new_one: a SETTINGS row without a field in LimitsSettings"]


@pytest.mark.parametrize("values, named", [
    ({"limits.max_ttl": "10"}, "limits.max_ttl"),
    ({"limits.max_ttl": 0}, "limits.max_ttl"),
    ({"registration.mode": "maybe"}, "registration.mode"),
    ({"registration.mode": "token"}, "registration.tokens"),
    ({"server.name": "not a name"}, "server.name"),
    ({"server.bogus": 1}, "server.bogus"),
    ({"store.backend": "postgresql"}, "store.postgres_dsn"),
])
def test_bad_values_are_named(values, named):
    with pytest.raises(SettingError) as info:
        resolve(values, {})
    assert str(info.value).startswith(named)


def test_command_line_overrides_file(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[server]\nname = "a.example"\nstate_dir = "/x"\n')
    settings = resolve(read_toml(str(config)), {"server.name": "b.example"})
    assert settings.server.name == "b.example" and settings.server.state_dir == "/x"


def test_unreadable_or_invalid_toml_is_one_line(tmp_path):
    with pytest.raises(SettingError, match="cannot read"):
        read_toml(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(SettingError, match="not valid TOML"):
        read_toml(str(bad))
