"""The engine's one seam (engine/step_hooks.py): what BUNNY_ENGINE_HOOKS names is loaded, by module or by file."""
import pytest

import fault_injection
from bunny_backend.engine import step_hooks


def test_no_hooks_unless_the_environment_names_some(monkeypatch):
    monkeypatch.delenv(step_hooks.ENV_VAR, raising=False)
    assert step_hooks.from_environment() is None


def test_a_module_name_or_a_file_path(monkeypatch):
    monkeypatch.setenv(step_hooks.ENV_VAR, "fault_injection:FaultInjector")
    assert isinstance(step_hooks.from_environment(), fault_injection.FaultInjector)
    monkeypatch.setenv(*fault_injection.ENGINE_HOOKS)   # by path, as the server's stub processes load it
    hooks = step_hooks.from_environment()
    assert type(hooks).__name__ == "FaultInjector" and callable(hooks.before_step)


@pytest.mark.parametrize("spec", ["fault_injection", "fault_injection:", ":FaultInjector"])
def test_a_malformed_spec_names_the_variable(monkeypatch, spec):
    monkeypatch.setenv(step_hooks.ENV_VAR, spec)
    with pytest.raises(ValueError, match="BUNNY_ENGINE_HOOKS must be MODULE:FACTORY"):
        step_hooks.from_environment()
