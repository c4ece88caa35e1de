"""The system registry: registering, plugins, entry points, module:attribute, and where a run's
system is reloaded from."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from pyro_physvae import systems
from pyro_physvae.cli import main
from pyro_physvae.data.io import save_dataset
from pyro_physvae.guides import PendulumGuide
from pyro_physvae.models import PendulumModel
from pyro_physvae.systems import (
    SYSTEMS,
    System,
    get_system,
    load_plugin,
    register_system,
    registered_systems,
    unregister_system,
)

PLUGIN = textwrap.dedent('''
    from pyro_physvae.guides import PendulumGuide
    from pyro_physvae.models import PendulumModel
    from pyro_physvae.systems import System, register_system

    def make_system():
        return System(name="NAME", model_cls=PendulumModel, guide_cls=PendulumGuide)

    register_system(make_system())
''')


def write_plugin(folder: Path, module: str, name: str) -> Path:
    path = folder / f"{module}.py"
    path.write_text(PLUGIN.replace("NAME", name))
    return path


@pytest.fixture
def clean_registry():
    """Registrations and modules of a test are removed after it."""
    before, modules = dict(systems._REGISTRY), set(sys.modules)
    yield
    systems._REGISTRY.clear()
    systems._REGISTRY.update(before)
    for name in set(sys.modules) - modules:
        if name.startswith("plugin_"):
            sys.modules.pop(name)


def test_builtins_and_defaults():
    assert registered_systems()[:4] == SYSTEMS
    pendulum = get_system("pendulum")
    assert pendulum.source == {"kind": "builtin"}
    assert pendulum.reg_weights == PendulumModel.reg_weights  # defaults come from the model
    with pytest.raises(ValueError, match=r"unknown system 'nope'; choose one of: pendulum, .*--plugin"):
        get_system("nope")


def test_register_records_the_calling_module_and_refuses_clashes(clean_registry):
    mine = register_system(System(name="pendulum-copy", model_cls=PendulumModel, guide_cls=PendulumGuide))
    assert mine.source["kind"] == "module" and mine.source["path"] == str(Path(__file__).resolve())
    assert get_system("pendulum-copy") is mine and "pendulum-copy" in registered_systems()
    # The generic model arguments are read off the data: the time grid.
    assert mine.model_kwargs_from_data is not None
    with pytest.raises(ValueError, match="built-in system"):
        register_system(System(name="pendulum", model_cls=PendulumModel, guide_cls=PendulumGuide))
    other = System(name="pendulum-copy", model_cls=PendulumModel, guide_cls=PendulumGuide,
                   source={"kind": "module", "path": "/elsewhere.py"})
    with pytest.raises(ValueError, match="already registered"):
        register_system(other)
    assert register_system(other, replace_existing=True) is get_system("pendulum-copy")
    unregister_system("pendulum-copy")
    with pytest.raises(ValueError, match="unknown system"):
        get_system("pendulum-copy")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "a:b"}, "without ':'"),
    ({"name": ""}, "non-empty"),
    ({"reg_weights": (1.0, 2.0)}, "reg_weights must be"),
    ({"model_cls": 3}, "model_cls must be a class"),
])
def test_bad_system_definitions(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        System(**{"name": "x", "model_cls": PendulumModel, "guide_cls": PendulumGuide, **kwargs})


def test_load_plugin_by_file_and_by_module(tmp_path, clean_registry, monkeypatch):
    path = write_plugin(tmp_path, "plugin_by_file", "sys-by-file")
    assert load_plugin(path) == ("sys-by-file",)
    assert load_plugin(path) == ("sys-by-file",)  # a second load registers nothing new
    assert get_system("sys-by-file").source["path"] == str(path.resolve())
    write_plugin(tmp_path, "plugin_by_module", "sys-by-module")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_plugin("plugin_by_module") == ("sys-by-module",)
    with pytest.raises(FileNotFoundError, match="plugin file not found"):
        load_plugin(tmp_path / "missing.py")
    with pytest.raises(ValueError, match="cannot import the plugin module 'no_such_module_here'"):
        load_plugin("no_such_module_here")


def test_module_attribute_reference_and_entry_points(tmp_path, clean_registry, monkeypatch):
    write_plugin(tmp_path, "plugin_reference", "sys-by-reference")
    monkeypatch.syspath_prepend(str(tmp_path))
    system = get_system("plugin_reference:make_system")
    assert system.name == "sys-by-reference"
    assert system.source == {"kind": "reference", "value": "plugin_reference:make_system"}
    with pytest.raises(ValueError, match="cannot load the system 'plugin_reference:nothing'"):
        get_system("plugin_reference:nothing")

    write_plugin(tmp_path, "plugin_entry", "sys-from-package")
    point = SimpleNamespace(name="sys-from-package", value="plugin_entry:make_system")
    monkeypatch.setattr(systems, "_entry_points", lambda: [point])
    assert "sys-from-package" in registered_systems()
    unregister_system("sys-from-package")  # the module registered it on import; start afresh
    sys.modules.pop("plugin_entry", None)
    system = get_system("sys-from-package")
    assert system.source == {"kind": "entry_point", "value": "plugin_entry:make_system"}


def test_a_run_reloads_its_system_from_the_recorded_file(tmp_path, tiny_datasets, clean_registry, capsys):
    path = write_plugin(tmp_path, "plugin_run", "sys-for-run")
    data = tmp_path / "data"
    for split, ds in tiny_datasets.items():  # pendulum data, labelled as the plugin's system
        save_dataset(ds.assign_attrs(system="sys-for-run"), data / f"{split}.nc")
    run = tmp_path / "run"
    assert main(["--plugin", str(path), "train", "--system", "sys-for-run", "--data", str(data),
                 "--out", str(run), "--epochs", "1", "--batch-size", "32", "--quiet",
                 "--model-option", "hidden_aux1=[8]", "--model-option", "hidden_aux2=[8]"]) == 0
    source = json.loads((run / "config.json").read_text())["system_source"]
    assert source == {"kind": "module", "module": "plugin_run", "path": str(path.resolve())}
    # A later process: neither the registration nor the module is there any more.
    unregister_system("sys-for-run")
    sys.modules.pop("plugin_run")
    assert main(["evaluate", str(run), "--samples", "2"]) == 0
    assert get_system("sys-for-run").source["path"] == str(path.resolve())
    # The plugin's file is gone: a clear error, not a traceback.
    unregister_system("sys-for-run")
    sys.modules.pop("plugin_run")
    path.unlink()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--samples", "2"]) == 2
    assert "cannot import 'plugin_run'" in capsys.readouterr().err


def test_systems_command_lists_plugins(tmp_path, clean_registry, capsys):
    path = write_plugin(tmp_path, "plugin_listed", "sys-listed")
    assert main(["--plugin", str(path), "systems"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in (*SYSTEMS, "sys-listed")) and str(path.resolve()) in out
    assert main(["generate", "--system", "sys-listed", "--out", str(tmp_path / "d")]) == 2
    assert "has no data generator" in capsys.readouterr().err
