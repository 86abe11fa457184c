"""`alpha` (the CE weight of alpha*CE + (1-alpha)*KD) and seed 003's alpha/beta keep every listed logit term and
multiply written weights instead of replacing them."""

import pytest

from lmdistill.config import StageSettings, config_from_dict
from lmdistill.train.stage import build_objective, logit_terms


def _weights(**stage) -> dict[str, float]:
    return {t.name: t.weight for t in logit_terms(StageSettings(name="s", **stage))}


def test_alpha_alone_is_the_classic_form():
    assert _weights(alpha=0.3, losses=[{"name": "forward_kl"}]) == pytest.approx(
        {"forward_kl": 0.7, "cross_entropy": 0.3})


def test_alpha_keeps_every_kd_term_and_multiplies_written_weights():
    got = _weights(alpha=0.3, losses=[{"name": "forward_kl", "weight": 2.0}, {"name": "reverse_kl"},
                                      {"name": "cross_entropy", "weight": 0.5}, {"name": "feature", "weight": 0.1}])
    assert got == pytest.approx({"forward_kl": 1.4, "reverse_kl": 0.7, "cross_entropy": 0.15})


def test_alpha_with_beta_weighs_kd_by_alpha_and_ce_by_beta():
    got = _weights(kind="non_policy", alpha=0.7, beta=0.2,
                   losses=[{"name": "jsd", "beta": 0.4, "weight": 0.5}, {"name": "forward_kl"}])
    assert got == pytest.approx({"jsd": 0.35, "forward_kl": 0.7, "cross_entropy": 0.2})
    objective = build_objective(StageSettings(name="s", kind="non_policy", alpha=0.7, beta=0.2,
                                              losses=[{"name": "jsd", "beta": 0.4, "weight": 0.5}]))
    assert objective.terms[0].params == {"beta": 0.4}  # the term's own parameters travel with it


def test_without_alpha_the_written_weights_are_the_weights():
    assert _weights(losses=[{"name": "forward_kl", "weight": 2.0}, {"name": "tvd"}]) == {"forward_kl": 2.0, "tvd": 1.0}


def test_saved_and_reloaded_config_gives_the_same_weights():
    """A run's saved config writes every weight out (weight: 1.0): reloading it must not change the objective."""
    from lmdistill.config import PipelineConfig

    stage = {"name": "s", "alpha": 0.4, "losses": [{"name": "forward_kl"}, {"name": "tvd", "weight": 3.0}]}
    config = config_from_dict({"stages": [stage]})
    again = config_from_dict(PipelineConfig.model_dump(config, mode="json", exclude_none=True))
    assert logit_terms(again.stages[0]) == logit_terms(config.stages[0])
