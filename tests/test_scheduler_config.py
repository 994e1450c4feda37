"""weights.scheduler: scheduler/ and inverse_scheduler/ read as diffusers builds them (class defaults for the
keys a file leaves out, from_config across classes), mapped classes logged, the rest refused."""
import json
import math

import pytest
import torch
from diffusers import (DDIMInverseScheduler, DDIMScheduler, DPMSolverMultistepInverseScheduler,
                       DPMSolverMultistepScheduler, PNDMScheduler)

import tiny
from diffedit_engine.engine.samplers import ddim, dpm
from diffedit_engine.weights import load_model, scheduler

SD15_PNDM = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}
DPM_FOLDER = {"_class_name": "DPMSolverMultistepScheduler", "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "steps_offset": 1,
              "timestep_spacing": "trailing", "final_sigmas_type": "sigma_min", "use_karras_sigmas": False}


def _same(cfg, ref):
    """Every key of the engine config equals the diffusers scheduler's config value."""
    for k in cfg.__dataclass_fields__:
        if k in ref.config:
            want = ref.config[k]
            got = getattr(cfg, k)
            if isinstance(want, float) and math.isinf(want):
                assert got == want, k
            else:
                assert got == (tuple(want) if isinstance(want, list) else want), (k, got, want)


def _write(root, sub, d):
    (root / sub).mkdir(parents=True, exist_ok=True)
    (root / sub / "scheduler_config.json").write_text(json.dumps(d))


def test_sd15_pndm_folder_runs_as_ddim_logged(caplog):
    with caplog.at_level("INFO", logger="diffedit_engine.weights.scheduler"):
        s = scheduler.from_json(SD15_PNDM)
    assert "PNDMScheduler runs as DDIMScheduler" in caplog.text
    assert s.family == "ddim" and s.scheduler == ddim.SchedulerConfig() == s.inverse_scheduler  # SD's numbers
    ref = DDIMScheduler.from_config(PNDMScheduler.from_config(SD15_PNDM).config)
    _same(s.scheduler, ref)
    _same(s.inverse_scheduler, DDIMInverseScheduler.from_config(ref.config))


@pytest.mark.parametrize("d", [{"_class_name": "DDIMScheduler"},  # every default: clip_sample on, ᾱ_final = 1
                               {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "thresholding": True,
                                "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.5,
                                "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
                               {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
                                "prediction_type": "v_prediction", "use_karras_sigmas": True},
                               {"_class_name": "DDIMScheduler", "trained_betas": [0.001] * 10,
                                "num_train_timesteps": 10}])
def test_ddim_family_equals_diffusers_from_config(d):
    s = scheduler.from_json(d)
    ref = DDIMScheduler.from_config(d)
    _same(s.scheduler, ref)
    _same(s.inverse_scheduler, DDIMInverseScheduler.from_config(d))
    assert torch.equal(ddim.alphas_cumprod(s.scheduler), ref.alphas_cumprod)
    if d.get("_class_name") == "DDIMScheduler" and len(d) == 1:
        assert s.scheduler.clip_sample and s.scheduler.set_alpha_to_one and s.scheduler.steps_offset == 0


def test_dpm_folder_selects_dpm_solver_not_ddim(tmp_path):
    _write(tmp_path, "scheduler", DPM_FOLDER)
    s = scheduler.read(tmp_path)
    assert s.family == "dpm++2m" and isinstance(s.scheduler, dpm.DPMSolverConfig)
    _same(s.scheduler, DPMSolverMultistepScheduler.from_config(DPM_FOLDER))
    _same(s.inverse_scheduler, DPMSolverMultistepInverseScheduler.from_config(DPM_FOLDER))
    with pytest.raises(TypeError, match="DPM"):  # a DDIM loop handed this config fails loudly
        ddim.schedule(s.scheduler, 10)
    # an inverse_scheduler/ of the same family is read with its own keys
    _write(tmp_path, "inverse_scheduler", {**DPM_FOLDER, "_class_name": "DPMSolverMultistepInverseScheduler",
                                           "timestep_spacing": "leading", "steps_offset": 2})
    s = scheduler.read(tmp_path)
    assert (s.inverse_scheduler.timestep_spacing, s.inverse_scheduler.steps_offset) == ("leading", 2)
    assert s.scheduler.timestep_spacing == "trailing"


def test_select_converts_like_from_config(caplog):
    s = scheduler.from_json(SD15_PNDM)
    with caplog.at_level("INFO", logger="diffedit_engine.weights.scheduler"):
        d = scheduler.select(s, "dpm++2m")
    assert "dpm++2m" in caplog.text and d.family == "dpm++2m"
    ref = DPMSolverMultistepScheduler.from_config(DDIMScheduler.from_config(SD15_PNDM).config)
    _same(d.scheduler, ref)
    assert d.scheduler.timestep_spacing == "linspace"  # DPM's default, as diffusers (the PNDM file sets none)
    _same(d.inverse_scheduler, DPMSolverMultistepInverseScheduler.from_config(SD15_PNDM))
    back = scheduler.select(scheduler.from_json(DPM_FOLDER), "ddim")
    _same(back.scheduler, DDIMScheduler.from_config(DPMSolverMultistepScheduler.from_config(DPM_FOLDER).config))
    assert scheduler.select(s, None) is s and scheduler.select(s, "ddim") is s
    with pytest.raises(ValueError, match="scheduler must be one of"):
        scheduler.select(s, "euler")


def test_inverse_scheduler_folder_and_single_file_defaults(tmp_path):
    _write(tmp_path, "scheduler", {**SD15_PNDM, "_class_name": "DDIMScheduler"})
    _write(tmp_path, "inverse_scheduler", {"_class_name": "DDIMInverseScheduler", "beta_start": 0.00085,
                                           "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                                           "set_alpha_to_one": False, "set_alpha_to_zero": True})
    s = scheduler.read(tmp_path, prediction_type="v_prediction")
    ref = DDIMInverseScheduler.from_pretrained(tmp_path, subfolder="inverse_scheduler",  # set_alpha_to_zero: ignored
                                               prediction_type="v_prediction")
    _same(s.inverse_scheduler, ref)
    assert not s.inverse_scheduler.set_alpha_to_one and s.inverse_scheduler.steps_offset == 0
    assert s.scheduler.prediction_type == s.inverse_scheduler.prediction_type == "v_prediction"
    sf = scheduler.from_json({}, prediction_type="v_prediction")
    assert sf.scheduler == ddim.SchedulerConfig(prediction_type="v_prediction")


@pytest.mark.parametrize("d, match", [
    ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "not supported"),
    ({"_class_name": "LCMScheduler"}, "not supported"),
    ({"beta_start": 0.001}, "_class_name"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, "solver_order")])
def test_refused_configs(d, match):
    with pytest.raises(ValueError, match=match):
        scheduler.from_json(d)


def test_mixed_families_refused():
    with pytest.raises(ValueError, match="mixed"):
        scheduler.from_json(DPM_FOLDER, {"_class_name": "DDIMInverseScheduler"})


def test_load_model_reads_both_folders(tmp_path):
    folder = tiny.make_folder(tmp_path / "m")
    _write(folder, "inverse_scheduler", {"_class_name": "DDIMInverseScheduler", "beta_start": 0.00085,
                                         "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": True,
                                         "clip_sample_range": 3.0, "steps_offset": 0})
    m = load_model(folder)
    assert m.scheduler is m.schedulers.scheduler and m.schedulers.family == "ddim"
    assert m.schedulers.inverse_scheduler.clip_sample and m.schedulers.inverse_scheduler.clip_sample_range == 3.0
    _write(folder, "scheduler", {**DPM_FOLDER, "prediction_type": "epsilon"})
    (folder / "inverse_scheduler" / "scheduler_config.json").unlink()
    m = load_model(folder)
    assert isinstance(m.scheduler, dpm.DPMSolverConfig) and m.schedulers.family == "dpm++2m"


def test_broken_scheduler_files_are_checkpoint_errors_naming_the_file(tmp_path):
    """issue 20 item 10: a schedule of no steps (num_train_timesteps 0) and a malformed file are one-line
    CheckpointErrors naming the file when the folder is read, not an AssertionError mid-run."""
    from diffedit_engine.weights import CheckpointError

    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.parent.mkdir()
    for content, match in ((json.dumps({**SD15_PNDM, "num_train_timesteps": 0}), "num_train_timesteps 0"),
                           (json.dumps({**SD15_PNDM, "num_train_timesteps": 1.5}), "num_train_timesteps 1.5"),
                           ("{not json", "not a readable JSON"), ("[1, 2]", "not a scheduler config")):
        path.write_text(content)
        with pytest.raises(CheckpointError, match=match) as e:
            scheduler.read(tmp_path)
        assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
