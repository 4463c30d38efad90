"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``soak`` run only when ``-m`` names them (``make soak``); every other run
    (plain ``pytest``, ``-m 'not slow'``, a file or node id) deselects them."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    soak = [item for item in items if item.get_closest_marker("soak") is not None]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if item.get_closest_marker("soak") is None]


@pytest.fixture(scope="session")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real model repository from ``models.demo.build_repository(quick=True)`` (~9 s, 2 cores).

    Contents::

        models.yaml                      models noun-topic, verb-topic, pos (version_policy
                                         "all", format per version) + embedding
                                         glove-6b-50d-subset
        embeddings/glove-6b-50d-subset/  float32, 50-d, ~23k rows: the 20 000 most frequent
                                         GloVe 6B words + every word of the sampled glosses
        noun-topic/1  stripped   26 labels    noun-topic/2  frozen (embedding-external)
        verb-topic/1  stripped   15 labels    verb-topic/2  frozen
        pos/1         stripped    4 labels    pos/2         frozen
        unlisted/noun-topic-selfcontained/1  frozen-selfcontained (embedding inside, own
                                         vocab.txt), NOT in models.yaml

    Versions 1 and 2 of a model hold the same weights (and so give the same probabilities);
    the self-contained noun model has noun-topic's weights too. Every model: filter widths
    1, 2, 3 with 32 filters, tokenizer max_len 100 / min_len 3. Trained on a few thousand
    real WordNet glosses for two epochs: accuracy is above chance but low.
    Treat it as read-only (it is shared by the whole session).
    """
    from models.demo import build_repository

    return build_repository(tmp_path_factory.mktemp("small_repo") / "repo", quick=True, seed=0)
