"""Reading and writing weight files: safetensors, and pickled .ckpt/.pt only through torch's safe loader."""

from __future__ import annotations

import json
import os
import pickle
import struct

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.atomic import atomic_path
from library.errors import CheckpointError

SAFETENSORS_EXTENSIONS = (".safetensors",)
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")


def add_checkpoint_arguments(parser) -> None:
    """Options about reading checkpoint files, shared by every family."""
    parser.add_argument(
        "--allow_pickle",
        action="store_true",
        help="load .ckpt/.pt files with full unpickling, which can run code hidden in the file. Only for files "
        "you trust that the safe loader rejects (by default pickled files are read with torch's weights-only loader)",
    )


def load_state_dict(path: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a weight file, keyed by name. Pickled files use the weights-only loader unless allowed."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    extension = os.path.splitext(path)[1].lower()
    if extension in SAFETENSORS_EXTENSIONS:
        return _load_safetensors(path)
    if extension in PICKLE_EXTENSIONS:
        return _load_pickle(path, allow_pickle)
    raise CheckpointError(
        f"{path}: unknown checkpoint extension {extension!r}; expected .safetensors, or one of "
        f"{', '.join(PICKLE_EXTENSIONS)} for pickled files, or a diffusers model folder"
    )


# safetensors dtype names -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read into memory of its own (not mapped from the file).

    A mapped file stays resident as a whole while any tensor of it lives; loaders that convert tensors one by one
    (library/checkpoints/weights.py) free each read tensor as soon as its converted copy exists, which lowers the
    load's peak by about the file's size.
    """
    try:
        with open(path, "rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(header_size))
            start = 8 + header_size
            tensors = {}
            for name, entry in header.items():
                if name != "__metadata__":
                    tensors[name] = _read_tensor(file, start, entry)
            return tensors
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err


def _read_tensor(file, data_start: int, entry: dict) -> torch.Tensor:
    begin, end = entry["data_offsets"]
    dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"]
    if end == begin:
        return torch.empty(shape, dtype=dtype)
    buffer = bytearray(end - begin)
    file.seek(data_start + begin)
    if file.readinto(buffer) != len(buffer):
        raise ValueError(f"the file ends inside tensor data (needs {end - begin} bytes at {data_start + begin})")
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def _load_pickle(path: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # files from torch < 1.6 cannot be memory-mapped; read them whole
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds objects the safe loader refuses ({str(err).splitlines()[0]}). If you trust the file, "
            "pass --allow_pickle, or convert it to .safetensors"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint: {err}") from err
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(loaded).__name__})")
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def check_weights_file(path: str, option: str) -> None:
    """A weights file given by `option` can be read safely: a .safetensors header that parses and a file as long as
    the header says, or a pickle of tensors only. Else CheckpointError, before any model loads."""
    if path.lower().endswith(SAFETENSORS_EXTENSIONS):
        try:
            end = _safetensors_data_end(path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{option} {path} is not a readable safetensors file ({err})") from None
        if os.path.getsize(path) < end:
            raise CheckpointError(
                f"{option} {path} is cut short: {os.path.getsize(path)} of its {end} bytes (an interrupted copy or "
                "download?)"
            )
        try:
            with safe_open(path, framework="pt", device="cpu") as handle:
                list(handle.keys())
        except Exception as err:  # safetensors raises its own error types for a damaged header
            raise CheckpointError(f"{option} {path} is damaged ({err})") from None
        return
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{option} {path} holds Python objects besides tensors, which safe loading refuses (a file from "
            "elsewhere could run code when loaded); save or convert it as .safetensors"
        ) from None
    except (OSError, RuntimeError, ValueError, EOFError) as err:
        raise CheckpointError(f"{option} {path} is damaged or incomplete ({err})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{option} {path} holds no tensors by name (found {type(loaded).__name__})")


def _safetensors_data_end(path: str) -> int:
    """The byte length a safetensors file must have: 8 + header + the end of its last tensor."""
    import struct

    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    return 8 + header_size + max(ends, default=0)


def safetensors_keys(path: str) -> list[str]:
    """The tensor names of a safetensors file, read from its header (no tensor is loaded)."""
    with safe_open(path, framework="pt", device="cpu") as handle:
        return list(handle.keys())


def read_safetensors_metadata(path: str) -> dict[str, str]:
    """The string metadata of a safetensors file (empty when it has none)."""
    with safe_open(path, framework="pt", device="cpu") as handle:
        return dict(handle.metadata() or {})


def save_state_dict(
    state_dict: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None
) -> None:
    """Write tensors atomically as .safetensors (with metadata) or as a pickled .ckpt/.pt by extension."""
    tensors = {key: value.detach().contiguous().cpu() for key, value in state_dict.items()}
    with atomic_path(path) as temp:
        if path.lower().endswith(SAFETENSORS_EXTENSIONS):
            save_file(tensors, temp, metadata=metadata)
        else:
            payload = {"state_dict": tensors}
            if metadata:
                payload["metadata"] = json.dumps(metadata)
            torch.save(payload, temp)
