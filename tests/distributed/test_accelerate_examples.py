"""The shipped accelerate configs load as accelerate reads them, with the distribution type their name says."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

EXAMPLES = Path(__file__).parents[2] / "examples" / "accelerate"


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero3", "DEEPSPEED")])
def test_example_config_loads(name, kind):
    config = load_config_from_file(str(EXAMPLES / f"{name}.yaml"))
    assert config.distributed_type == kind and config.num_processes == 2 and config.num_machines == 1
    if name == "fsdp":
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if name == "deepspeed_zero3":
        assert config.deepspeed_config["zero_stage"] == 3
