"""runtime.presets (issue 23 item 5): the speed presets as settings and a precision, through the Editor, the
command line and manifests. Explicit values always win over a preset; exact is today's computation."""
import json

import pytest
import torch
from PIL import Image

from diffedit_engine import cli
from diffedit_engine.engine.edit.settings import EditSettings
from diffedit_engine.engine.jobs import manifest
from diffedit_engine.engine.runtime import Editor, cpu, presets
from diffedit_engine.weights import load_model

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def model(tiny_folder):
    return str(tiny_folder("sd1"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "cat.png"
    Image.open(cli.sample_image()).convert("RGB").resize((32, 32)).save(p)
    return p


def test_preset_values_are_valid_settings_and_exact_is_the_default():
    assert presets.settings("exact") == {}
    for name in presets.NAMES:
        EditSettings().updated(**presets.settings(name)).checked(2)  # every preset is a legal edit of 2 pairs
    fast, fastest = (EditSettings().updated(**presets.settings(n)) for n in ("fast", "fastest"))
    # each step down does no more work on any lever than the one above it
    for lever in ("steps", "num_maps"):
        assert getattr(fastest, lever) <= getattr(fast, lever) <= getattr(EditSettings(), lever)
    assert fastest.cache_interval >= fast.cache_interval >= 1
    with pytest.raises(ValueError, match="preset 'quick': use one of exact, fast, fastest"):
        presets.get("quick")
    with pytest.raises(ValueError, match="measured on SD UNet models"):
        presets.settings("fast", "sd3")
    assert presets.settings("exact", "flux-dev") == {}


def test_preset_dtype_follows_the_cpu(monkeypatch, model, tmp_path):
    monkeypatch.setattr(cpu, "cpu_has_native_bf16", lambda: True)
    assert presets.dtype("exact", None, "cpu") == torch.float32
    assert presets.dtype("fast", None, "cpu") == torch.bfloat16
    assert presets.dtype("fast", None, "cuda") == torch.float16  # CUDA keeps its own default
    # a narrow UNet (the tiny test model, the shapes model) is overhead-bound: bf16 does not pay, fp32 stays
    assert presets.small_unet(model) and presets.dtype("fast", None, "cpu", model) == torch.float32
    assert not presets.small_unet(tmp_path) and presets.dtype("fast", None, "cpu", tmp_path) == torch.bfloat16
    monkeypatch.setattr(cpu, "cpu_has_native_bf16", lambda: False)
    assert presets.dtype("fastest", None, "cpu") == torch.float32  # emulated bf16 is slower than fp32


def test_editor_preset_defaults_and_overrides(model):
    m = load_model(model)
    ed = Editor(m, preset="fast")
    assert ed.defaults == EditSettings().updated(**presets.settings("fast"))
    exact = Editor(m)
    assert exact.defaults == EditSettings()
    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    pairs = [("a cat", "a dog")]
    # preset= on a call gives that preset's edit, whatever the Editor's own preset; keywords win over both
    a = ed.edit(img, pairs, preset="exact", steps=4, num_maps=1, output="latent")
    b = exact.edit(img, pairs, steps=4, num_maps=1, output="latent")
    assert torch.equal(a.latents, b.latents)
    c = exact.edit(img, pairs, preset="fast", steps=4, output="latent")
    d = exact.edit(img, pairs, EditSettings(**{**presets.settings("fast"), "steps": 4}), output="latent")
    assert torch.equal(c.latents, d.latents) and not torch.equal(c.latents, b.latents)
    with pytest.raises(ValueError, match="preset 'turbo'"):
        Editor(m, preset="turbo")


def test_cli_preset_sets_settings_and_flags_win(capsys, tmp_path, model, photo):
    out = tmp_path / "f.png"
    rc = cli.main(["edit", "--model", model, "--image", str(photo), "--edit", "cat -> dog", "--out", str(out),
                   "--preset", "fast", "--steps", "4", "--maps", "2", "--dtype", "float32"])
    _, err = capsys.readouterr()
    assert rc == 0, err
    s = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert (s["scheduler"], s["steps"], s["num_maps"]) == ("dpm++2m", 4, 2)  # the preset's sampler, the flags' counts
    rc = cli.main(["edit", "--model", model, "--image", str(photo), "--edit", "cat -> dog", "--out",
                   str(tmp_path / "x.png"), "--preset", "turbo"])
    _, err = capsys.readouterr()
    assert rc == 2 and "--preset" in err and "turbo" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_manifest_preset_under_the_jobs_own_fields(tmp_path):
    (tmp_path / "jobs.jsonl").write_text(
        '{"image": "a.png", "edits": ["cat -> dog"], "preset": "fastest", "steps": 12}\n'
        '{"image": "b.png", "edits": ["cat -> dog"], "preset": "slow"}\n'
        '{"image": "c.png", "edits": ["cat -> dog"]}\n')
    a, b, c = manifest.read_manifest(tmp_path / "jobs.jsonl")
    assert a.error is None and a.settings == {**presets.settings("fastest"), "steps": 12}
    assert "preset 'slow'" in b.error
    assert c.settings == {}
