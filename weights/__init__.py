"""Checkpoint discovery, key conversion and loading: `load_model(path) -> Model`.

files.py   where the weights are (diffusers folder, single file, hub id in the local HF cache) and safetensors
           headers checked before any read; pickles refused
keys.py    the one key map (CompVis/A1111 single-file and legacy diffusers names -> engine names)
detect.py  single files: SD1/SD2/SD-XL/inpainting detection and configs inferred from shapes; the families
           refused by name (SD-XL refiner, FLUX until its loader lands)
parts.py   what every loader shares: a component's tensors, the key/shape check, meta build + strict load
model.py   Model and load_model: meta-device modules filled by a strict load_state_dict(assign=True); SD 3.x
           folders and files go on to sd3.py
sd3.py     SD 3 / 3.5 / 3.5 Medium: diffusers folders and Stability's single files (sd3_keys.py) -> FlowModel
           (flow_model.py); T5's tokenizer in t5_tokenizer.py

Single files do not record their prediction type: SD1, SD1-inpaint and SD2-inpaint load as epsilon, SD2 as
v_prediction (diffusers' from_single_file default, the SD 2.x 768-v models) with a warning; pass
prediction_type="epsilon" for SD2-base. Attention head and GroupNorm counts follow SD's conventions; pass
config=<diffusers folder or hub id> for a checkpoint that does not.
"""
from .files import CheckpointError
from .model import Model, load_model

__all__ = ["CheckpointError", "Model", "load_model"]
