"""What a stage leaves and where a slice starts: best/ carries the learned loss projections as final/ does; a
slice starting later says which student it starts from."""

import logging

from safetensors.torch import load_file

from lmdistill.config import config_from_dict
from lmdistill.train.pipeline import run_pipeline

AUX = "aux_terms.safetensors"
FEATURE_KD = [{"name": "forward_kl"}, {"name": "feature", "weight": 0.1, "layers": "uniform"}]


def test_best_carries_the_feature_projection_like_final(tiny_pipeline):
    """Teacher 128 wide, student 64: the feature term learns a projection, saved next to both students."""
    stage = {"name": "a", "max_steps": 2, "eval_steps": 1, "save_steps": 1, "losses": FEATURE_KD}
    run_dir = run_pipeline(config_from_dict(tiny_pipeline([stage], evaluation={"enabled": False, "report": False})))
    best, final = run_dir / "a" / "best" / AUX, run_dir / "a" / "final" / AUX
    assert best.exists() and final.exists()
    assert set(load_file(best)) == set(load_file(final))


def test_a_later_start_without_an_earlier_best_says_what_it_starts_from(tiny_pipeline, student_dir, caplog):
    stages = [{"name": "a", "max_steps": 1}, {"name": "b", "max_steps": 1}]
    config = config_from_dict(tiny_pipeline(stages, evaluation={"enabled": False, "report": False}))
    with caplog.at_level(logging.INFO, logger="lmdistill.train.pipeline"):
        run_dir = run_pipeline(config, start_stage=2)
    assert (f"stage b starts from the configured student {student_dir}: {run_dir} holds no finished stage a and "
            "no --checkpoint_path was given") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lmdistill.train.pipeline"):
        run_pipeline(config.model_copy(update={"output_dir": str(run_dir) + "_2"}), start_stage=2,
                     checkpoint_path=str(run_dir / "b" / "best"))
    assert f"stage b starts from the checkpoint {run_dir / 'b' / 'best'}" in caplog.text
