"""examples/accelerate/*.yaml: Accelerate reads them as the sharded launches docs/training.md gives."""
import pathlib

import pytest
from accelerate.commands.config.config_args import load_config_from_file

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, engine", [("fsdp2.yaml", "FSDP"), ("zero3.yaml", "DEEPSPEED")])
def test_the_sharded_launch_configs_read_as_documented(name, engine):
    path = ROOT / "examples" / "accelerate" / name
    config = load_config_from_file(str(path))
    assert config.distributed_type == engine and config.mixed_precision == "bf16" and not config.use_cpu
    if engine == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"  # per decoder layer
    else:  # the stage gathers the whole weights at the end: ZeRO-3 must be told to allow it
        assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_save_16bit_model"]
    assert f"--config_file examples/accelerate/{name}" in (ROOT / "docs" / "training.md").read_text()
