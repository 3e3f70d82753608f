"""Where the commands' compilation cache lives, and that it never stops a command."""
from __future__ import annotations

import jax
import pytest

from ccstae_jax import cli, compilation_cache


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv(compilation_cache.ENV_CACHE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


@pytest.fixture
def config_updates(monkeypatch):
    """The ``jax.config.update`` calls made, recorded instead of applied (the test process keeps its own cache)."""
    calls = []
    monkeypatch.setattr(jax.config, "update", lambda name, value: calls.append((name, value)))
    return calls


def test_default_directory_is_under_the_user_cache(clean_env):
    assert compilation_cache.chosen_directory() == clean_env / "xdg" / "ccstae-jax" / "xla"


def test_ccstae_variable_names_the_folder(clean_env, monkeypatch):
    monkeypatch.setenv(compilation_cache.ENV_CACHE, str(clean_env / "mine"))
    assert compilation_cache.chosen_directory() == clean_env / "mine"


@pytest.mark.parametrize("value", ["off", "0", "False", "", "no"])
def test_ccstae_variable_switches_the_cache_off(clean_env, monkeypatch, config_updates, value):
    monkeypatch.setenv(compilation_cache.ENV_CACHE, value)
    assert compilation_cache.chosen_directory() is None
    assert compilation_cache.enable() is None
    assert config_updates == []


def test_jax_own_setting_is_left_alone(clean_env, monkeypatch, config_updates):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(clean_env / "jax"))
    monkeypatch.setenv(compilation_cache.ENV_CACHE, str(clean_env / "mine"))
    assert compilation_cache.enable() is None
    assert config_updates == []


def test_enable_creates_the_folder_and_points_jax_at_it(clean_env, config_updates):
    path = compilation_cache.enable()
    assert path.is_dir()
    assert config_updates == [("jax_compilation_cache_dir", str(path))]


def test_a_folder_that_cannot_be_made_leaves_the_cache_off(clean_env, config_updates):
    blocker = clean_env / "a_file"
    blocker.write_text("not a folder")
    assert compilation_cache.enable(blocker / "xla") is None
    assert config_updates == []


def test_every_command_turns_the_cache_on(clean_env, monkeypatch):
    called = []
    monkeypatch.setattr(compilation_cache, "enable", lambda: called.append(True))
    code = cli.main(["evaluate", str(clean_env / "missing.h5"), "--labels", str(clean_env / "missing_data.h5")])
    assert code == cli.EXIT_BAD_INPUT
    assert called == [True]
