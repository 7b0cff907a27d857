"""model/stages.py: the stage table and the run search every script uses (where a stage starts, the newest chat
model, the demo's runs under out/demo/)."""
import os

import pytest

from model import stages
from model.errors import StageError
from model.evaluate import resolve_checkpoint


def fake_run(path, mtime):
    os.makedirs(path, exist_ok=True)
    weights = os.path.join(path, "model.safetensors")
    open(weights, "wb").close()
    os.utime(weights, (mtime, mtime))
    return str(path)


def test_chat_stages_are_newest_first_and_each_starts_from_a_known_stage():
    assert stages.CHAT_STAGES == ("dpo", "sft_multi", "sft_single")
    assert stages.PRETRAIN_STAGES == ("pretrain",)
    assert stages.STAGES["dpo"].starts_from == ("sft_multi", "sft_single")


def test_find_start_prefers_the_first_starting_stage_and_narrows_by_shape(tmp_path):
    root = str(tmp_path)
    single = fake_run(tmp_path / "sft_single_64", 100)
    assert stages.find_start("dpo", root=root) == single  # no sft_multi run: the fallback
    multi = fake_run(tmp_path / "sft_multi_64", 50)      # older, but the preferred stage
    assert stages.find_start("dpo", root=root) == multi
    assert stages.find_start("dpo", dim=128, root=root) is None
    fake_run(tmp_path / "sft_multi_64_moe", 200)
    assert stages.find_start("dpo", dim=64, use_moe=False, root=root) == multi


def test_the_newest_chat_model_is_found_in_out_and_in_the_demo_folder(tmp_path):
    root = str(tmp_path)
    assert stages.find_newest(stages.CHAT_STAGES, root) is None
    fake_run(tmp_path / "sft_multi_512", 300)
    demo_dpo = fake_run(tmp_path / "demo" / "dpo", 100)  # after `make demo`: a later stage wins over a newer run
    assert stages.find_newest(stages.CHAT_STAGES, root) == demo_dpo
    newer_dpo = fake_run(tmp_path / "dpo_512", 400)       # same stage: the newest weights win
    assert stages.find_newest(stages.CHAT_STAGES, root) == newer_dpo
    assert resolve_checkpoint(None, stages.CHAT_STAGES, root) == newer_dpo
    assert stages.find_newest(stages.PRETRAIN_STAGES, root) is None


def test_no_checkpoint_names_every_place_searched(tmp_path):
    with pytest.raises(StageError) as err:
        resolve_checkpoint(None, stages.CHAT_STAGES, str(tmp_path))
    assert f"{tmp_path}/dpo_*" in str(err.value) and f"{tmp_path}/*/dpo" in str(err.value)
