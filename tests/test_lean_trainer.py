"""raymix's runs start Ray Train without the actors that cannot serve them:
its DatasetManager (raymix gives its trainer no ``datasets``) and, where
Ray's State API does not answer (a local Ray without its dashboard, as raymix
starts one), its PlacementGroupCleaner, which polls that API."""

from __future__ import annotations

import pytest

from raymix.driver.single import lean_trainer_class, state_api_answers


def _callbacks(trainer_class, datasets=None):
    import ray.train

    trainer = trainer_class(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
    if datasets is not None:
        trainer.datasets = datasets
    return sorted(type(c).__name__ for c in trainer._create_default_callbacks())


@pytest.mark.ray
def test_a_local_run_starts_neither_dataset_manager_nor_placement_group_cleaner(ray_local) -> None:
    from ray.train.torch import TorchTrainer

    lean = lean_trainer_class()
    assert lean is not TorchTrainer and issubclass(lean, TorchTrainer)
    assert not state_api_answers()  # ray_local starts Ray without its dashboard, as raymix does
    ray_own = _callbacks(TorchTrainer)
    assert {"DatasetsCallback", "PlacementGroupCleanerCallback"} <= set(ray_own)
    dropped = {"DatasetsCallback", "PlacementGroupCleanerCallback"}
    assert _callbacks(lean) == sorted(c for c in ray_own if c not in dropped)  # nothing else left out
    # Given datasets, their manager stays.
    assert "DatasetsCallback" in _callbacks(lean, datasets={"train": object()})


@pytest.mark.ray
def test_the_cleaner_stays_where_the_state_api_answers(ray_local, monkeypatch) -> None:
    import raymix.driver.single as single

    monkeypatch.setattr(single, "state_api_answers", lambda: True)
    assert "PlacementGroupCleanerCallback" in _callbacks(lean_trainer_class())
