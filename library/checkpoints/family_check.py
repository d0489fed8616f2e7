"""Which model family a single checkpoint file holds, and which scripts train it: a family refuses another family's
file before anything loads, with one line naming the script the user wants."""

from __future__ import annotations

from library.checkpoints.files import load_state_dict
from library.checkpoints.sd_keys import detect_model_type
from library.errors import CheckpointError

# detect_model_type's answer -> (what it is, LoRA script, full-training script)
SCRIPTS = {
    "sd1": ("an SD 1.x checkpoint", "train_network.py", "fine_tune.py"),
    "sd2": ("an SD 2.x checkpoint", "train_network.py", "fine_tune.py"),
    "sdxl": ("an SDXL checkpoint", "sdxl_train_network.py", "sdxl_train.py"),
    "sd3": ("an SD3 / SD3.5 model", "sd3_train_network.py", "sd3_train.py"),
    "flux": ("a FLUX.1 transformer", "flux_train_network.py", "flux_train.py"),
    "lumina": ("a Lumina Image 2.0 model", "lumina_train_network.py", "lumina_train.py"),
}


def file_keys(path: str, allow_pickle: bool = False) -> list[str]:
    """The tensor names of a weight file (a safetensors file's header only)."""
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as handle:
                return list(handle.keys())
        except Exception as err:  # safetensors raises several private error types for a damaged header
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    return list(load_state_dict(path, allow_pickle))


def refuse_other_family(
    path: str,
    own: tuple[str, ...],
    full_training: bool | None = None,
    allow_pickle: bool = False,
    keys: list[str] | None = None,
) -> None:
    """Raise CheckpointError when the file holds another family's model than `own` (detect_model_type names);
    `full_training` picks the script to name (None: both). `keys` saves reading the file again."""
    found = detect_model_type(file_keys(path, allow_pickle) if keys is None else keys)
    if found in SCRIPTS and found not in own:
        what, network_script, full_script = SCRIPTS[found]
        scripts = {None: f"{network_script} / {full_script}", True: full_script, False: network_script}
        raise CheckpointError(f"{path} holds {what}, which this script does not train: train it with "
                              f"{scripts[full_training]}")  # fmt: skip


# A diffusers folder's pipeline class (model_index.json) -> the family names of SCRIPTS.
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd1",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "Lumina2Pipeline": "lumina",
}


def folder_family(path: str) -> str | None:
    """The family of a diffusers folder, read from its model_index.json (None when unknown)."""
    import json
    import os

    index = os.path.join(path, "model_index.json")
    try:
        with open(index, encoding="utf-8") as handle:
            pipeline = json.load(handle).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return PIPELINE_FAMILIES.get(pipeline)


def refuse_other_family_folder(path: str, own: tuple[str, ...], full_training: bool | None = None) -> None:
    """Raise CheckpointError when a diffusers folder holds another family's pipeline than `own`."""
    found = folder_family(path)
    if found is not None and found not in own and not (found == "sd1" and "sd2" in own):
        what, network_script, full_script = SCRIPTS[found]
        scripts = {None: f"{network_script} / {full_script}", True: full_script, False: network_script}
        what = what.replace("checkpoint", "model").replace("transformer", "model")
        raise CheckpointError(f"{path} is a diffusers folder of {what}, which this script does not train: train it "
                              f"with {scripts[full_training]}")  # fmt: skip
