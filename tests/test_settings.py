from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.settings import Settings


def test_embedded_defaults_live_under_home(tmp_path):
    settings = Settings(home=tmp_path / "home")
    assert settings.resolved_database_url() == f"sqlite:///{tmp_path / 'home' / 'detox.db'}"
    assert (tmp_path / "home").is_dir()
    assert settings.resolved_broker_url() == "filesystem://"
    folders = settings.broker_folders()
    assert folders["data_folder_in"] == folders["data_folder_out"]
    assert all(path.is_dir() and tmp_path in path.parents for path in folders.values())


def test_urls_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DETOX_DATABASE_URL", "postgresql+psycopg://u@db/detox")
    monkeypatch.setenv("DETOX_BROKER_URL", "redis://127.0.0.1:6379/0")
    settings = Settings(home=tmp_path)
    assert settings.resolved_database_url() == "postgresql+psycopg://u@db/detox"
    assert settings.resolved_broker_url() == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    "field, value", [("database_url", "mysql://x/y"), ("broker_url", "http://x")]
)
def test_bad_urls_are_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})
