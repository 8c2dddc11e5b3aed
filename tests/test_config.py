import pytest

from medtune.config import ConfigError, build_config, load_config


def test_dotted_overrides_are_typed():
    cfg = build_config({}, ["lora.r=32", "optim.lr=5e-4", "model.family=sam", "data.mask_suffixes=[_seg, _mask]"])
    assert cfg.lora.resolved_r() == 32 and cfg.lora.resolved_alpha() == 64
    assert cfg.optim.lr == 5e-4 and cfg.model.family == "sam" and cfg.data.mask_suffixes == ["_seg", "_mask"]


def test_presets():
    assert [build_config({}, [f"lora.preset={p}"]).lora.resolved_r() for p in ("small", "medium", "large")] == [8, 32, 64]


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rank: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "lora.rank" in msg and "lora.r" in msg and "lora.target_modules" in msg


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="unknown key 'optimizer'.*optim"):
        build_config({"optimizer": {"lr": 1}})


def test_bad_value_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="optim.lr"):
        build_config({}, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        build_config({}, ["lora.r"])


def test_finetune_auto():
    assert build_config({}).finetune_mode() == "full"
    assert build_config({}, ["model.path=/some/model"]).finetune_mode() == "lora"
    assert build_config({}, ["model.path=/some/model", "model.finetune=full"]).finetune_mode() == "full"


def test_resolved_config_round_trips(tmp_path):
    cfg = build_config({}, ["lora.r=16", "rl.reward={dice: 0.7, recall: 0.3}"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_box_prompt_requires_whole_image_sampling():
    with pytest.raises(ConfigError, match="whole_image"):
        build_config({}, ["model.prompt=box"])
    assert build_config({}, ["model.prompt=box", "data.sampling=whole_image"]).model.prompt == "box"


@pytest.mark.parametrize("override", ["train.log_every=0", "rl.group_size=1", "rl.temperature=0",
                                      "rl.inner_epochs=0", "optim.max_steps=0", "data.batch_size=0"])
def test_out_of_range_values_fail_at_load_time(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        build_config({}, [override])


def test_rl_rejects_gradient_accumulation():
    with pytest.raises(ConfigError, match="grad_accum"):
        build_config({}, ["objective=rl", "optim.grad_accum=2"])
