"""The public front: ``__all__`` holds every name API.md promises; nothing dangles."""

from __future__ import annotations

import importlib
import importlib.resources
import inspect
import pkgutil
import tomllib
from pathlib import Path

import pytest

import backbeat_trio as bb3
import backbeat_trio.testing

# Every name /work/shared/API.md shows on the package (the contract: add, never rename).
API_NAMES = {
    "BackbeatError",
    "BarReport",
    "BeatBudgetExceeded",
    "BeatFrame",
    "Config",
    "ConfigError",
    "HAPulseConfig",
    "HLC",
    "HealthStatus",
    "InvalidStatusClaim",
    "Keyring",
    "LegacyBeatInfo",
    "NotConnected",
    "PulseConfig",
    "ReverbConfig",
    "SignatureError",
    "StatusClaim",
    "TempoChange",
    "client_collector",
    "from_legacy",
    "generate_signing_key",
    "load_signing_key",
    "open_client",
    "open_embedded_nats",
    "run_pulse",
    "run_reverb",
    "serve_admin",
    "to_legacy",
    "verify_claim",
    "window_id",
}

# The methods and properties API.md shows on the client.
CLIENT_API = {
    "beats",
    "downbeats",
    "on_beat",
    "on_downbeat",
    "emit_status",
    "beat_budget",
    "fail_after_beats",
    "with_beat_budget",
    "wait_for_downbeat",
    "current_beat",
    "current_window",
    "in_window",
    "current_tempo",
    "tempo_drift",
    "health",
}


def test_every_api_name_is_exported_and_importable() -> None:
    missing = API_NAMES - set(bb3.__all__)
    assert not missing, f"API.md names missing from __all__: {sorted(missing)}"
    for name in bb3.__all__:
        assert getattr(bb3, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from backbeat_trio import *", namespace)  # what users write
    assert set(namespace) >= API_NAMES


def test_all_is_sorted_unique_and_names_only_public_things() -> None:
    assert len(bb3.__all__) == len(set(bb3.__all__))
    assert list(bb3.__all__) == sorted(bb3.__all__, key=lambda n: (n != n.upper(), n))
    assert all(not name.startswith("_") for name in bb3.__all__)
    # a public class or function defined in the package is re-exported from the front, not reached
    # through a private module
    for name in bb3.__all__:
        obj = getattr(bb3, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__.startswith("backbeat_trio"), (name, obj.__module__)


def test_errors_form_one_tree() -> None:
    for name in (
        "ConfigError",
        "InvalidStatusClaim",
        "BeatBudgetExceeded",
        "NotConnected",
        "SignatureError",
        "WireError",
        "UndeliveredClaims",
    ):
        assert issubclass(getattr(bb3, name), bb3.BackbeatError), name
    assert issubclass(bb3.BeatBudgetExceeded, TimeoutError)
    assert issubclass(bb3.UndeliveredClaims, bb3.NotConnected)


def test_every_library_error_class_lives_in_the_errors_module() -> None:
    # the CLI's own control flow (argument errors, the demo's agents ending) is not library API
    defined_elsewhere = []
    for info in pkgutil.walk_packages(backbeat_trio.__path__, "backbeat_trio."):
        if info.name.split(".")[1] == "_cli":
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == info.name
                and info.name != "backbeat_trio._errors"
            ):
                defined_elsewhere.append(f"{info.name}.{name}")
    assert not defined_elsewhere


def test_client_has_the_documented_surface() -> None:
    missing = {name for name in CLIENT_API if not hasattr(bb3.Client, name)}
    assert not missing


def test_config_reads_the_environment() -> None:
    cfg = bb3.Config.from_env({"BACKBEAT_CLUSTER_ID": "prod", "BACKBEAT_AGENT_ID": "agent-7"})
    assert (cfg.cluster_id, cfg.agent_id) == ("prod", "agent-7")


def test_every_config_takes_the_one_connection_options_type() -> None:
    assert "ConnectionOptions" in bb3.__all__
    for config in (bb3.Config, bb3.PulseConfig, bb3.HAPulseConfig, bb3.ReverbConfig):
        assert issubclass(config, bb3.ConnectionOptions), config


def test_py_typed_ships_with_the_package() -> None:
    marker = importlib.resources.files("backbeat_trio") / "py.typed"
    assert marker.is_file()
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    config = tomllib.loads(pyproject.read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["backbeat_trio"]


@pytest.mark.parametrize("name", backbeat_trio.testing.__all__)
def test_testing_helpers_are_exported(name: str) -> None:
    assert getattr(backbeat_trio.testing, name) is not None
    module = importlib.import_module("backbeat_trio.testing")
    assert name in vars(module)
