"""EngineOptions: the engine's switches from the recipe and the environment, read in one place."""

from __future__ import annotations

import pytest
from visionft.engine.options import EngineOptions
from visionft_api.recipe import TrainingSettings


def test_defaults_without_any_switch():
    assert EngineOptions.resolve(env={}) == EngineOptions(
        optimizations=True, cuda_graphs=True, sync_debug=False, packing=False
    )


@pytest.mark.parametrize(
    "value,on", [("1", False), ("true", False), (" Yes ", False), ("0", True), ("", True)]
)
def test_the_kernel_switch_turns_the_optimizations_off_unless_they_are_explicit(value, on):
    env = {"VISIONFT_DISABLE_KERNELS": value}
    assert EngineOptions.resolve(env=env).optimizations is on
    assert EngineOptions.resolve(optimizations=True, env=env).optimizations is True
    assert EngineOptions.resolve(optimizations=False, env={}).optimizations is False


@pytest.mark.parametrize("value,on", [("0", False), ("off", False), ("No", False), ("1", True), ("", True)])
def test_the_graph_switch(value, on):
    assert EngineOptions.resolve(env={"VISIONFT_CUDA_GRAPHS": value}).cuda_graphs is on


def test_the_sync_debug_switch_is_exactly_one():
    assert EngineOptions.resolve(env={"VISIONFT_SYNC_DEBUG": "1"}).sync_debug
    assert not EngineOptions.resolve(env={"VISIONFT_SYNC_DEBUG": "yes"}).sync_debug


def test_the_recipe_is_explicit_so_the_kernel_switch_leaves_it_alone():
    training = TrainingSettings(max_steps=1, optimizations=False, packing=True)
    options = EngineOptions.from_recipe(training, env={"VISIONFT_CUDA_GRAPHS": "0"})
    assert options == EngineOptions(optimizations=False, cuda_graphs=False, sync_debug=False, packing=True)
    on = EngineOptions.from_recipe(TrainingSettings(max_steps=1), env={"VISIONFT_DISABLE_KERNELS": "1"})
    assert on.optimizations is True and on.packing is False


def test_the_environment_is_read_when_resolving_not_later(monkeypatch):
    monkeypatch.setenv("VISIONFT_CUDA_GRAPHS", "0")
    options = EngineOptions.resolve()
    monkeypatch.setenv("VISIONFT_CUDA_GRAPHS", "1")
    assert options.cuda_graphs is False
    with pytest.raises(AttributeError):
        options.cuda_graphs = True  # type: ignore[misc]


@pytest.mark.parametrize("mode,offload", [("offload", True), ("on", False), ("off", False)])
def test_offloaded_checkpointing_comes_from_the_recipe(mode, offload):
    training = TrainingSettings(max_steps=1, gradient_checkpointing=mode)
    assert EngineOptions.from_recipe(training, env={}).offload_checkpoints is offload
