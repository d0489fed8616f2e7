"""Method `textual_inversion_xti`: Extended Textual Inversion (XTI, "P+", Voynov et al. 2023) for SD 1.x / 2.x.

The new word gets its own vectors for every cross-attention layer of the UNet: the captions are encoded once per
layer (with that layer's vectors) and each layer attends to its own encoding. The file holds one tensor per layer
under the layer's original-UNet name (IN01 ... MID ... OUT11 for SD 1.x / 2.x), each (vectors per token, width):
the layout the reference trainer writes and XTI-aware tools read.
"""

from __future__ import annotations

import argparse
import logging
import re

import torch

from library.atomic import atomic_path
from library.checkpoints.files import load_state_dict, save_state_dict
from library.errors import CheckpointError, ConfigError
from library.families.base import LoadedModels, ModelFamily
from library.methods.textual_inversion import SAVE_DTYPES, TextualInversionMethod

logger = logging.getLogger(__name__)

_CROSS_ATTENTION = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.|^mid_block\.attentions\.0\.")
_LAYER_NAME = re.compile(r"IN\d\d|MID|OUT\d\d")


def _layer_rank(name: str) -> tuple[int, int]:
    """Forward order of a layer name: input blocks, the middle block, output blocks."""
    if name == "MID":
        return 1, 0
    return (0 if name.startswith("IN") else 2), int(name.lstrip("INOUT"))


class LayeredTokenEmbedding(torch.nn.Module):
    """A token embedding whose added ids map to the vectors of the layer being encoded (`layer`); base frozen."""

    def __init__(self, base: torch.nn.Embedding, vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.vocab_size = base.num_embeddings
        self.vectors = torch.nn.Parameter(vectors)  # (L, N, D)
        self.layer = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        base = self.base(input_ids.clamp(max=self.vocab_size - 1))  # (B, T, D)
        added = self.vectors[self.layer][(input_ids - self.vocab_size).clamp(min=0)]  # (B, T, D)
        return torch.where((input_ids >= self.vocab_size).unsqueeze(-1), added.to(base.dtype), base)


def cross_attention_layers(unet: torch.nn.Module) -> list[tuple[str, list[torch.nn.Module]]]:
    """The UNet's cross-attention layers in forward order, each as (original-UNet name, its attn2 modules).

    Names follow the LDM UNet's block numbering: input block 1 + b * (layers + 1) + i (IN01, IN02, IN04 ... for SD),
    the middle block (MID), output block b * (layers + 1) + i (OUT03 ... OUT11).
    """
    layers: dict[str, list[torch.nn.Module]] = {}
    order: dict[str, tuple[int, int, int]] = {}
    for name, module in unet.named_modules():
        match = _CROSS_ATTENTION.match(name)
        if match is None or not name.endswith(".attn2"):
            continue
        if match.group(1) is None:
            label, rank = "MID", (1, 0, 0)
        else:
            block, index = int(match.group(2)), int(match.group(3))
            part = getattr(unet, match.group(1))[block]
            if match.group(1) == "down_blocks":
                label, rank = f"IN{1 + block * (len(part.resnets) + 1) + index:02d}", (0, block, index)
            else:
                label, rank = f"OUT{block * len(part.resnets) + index:02d}", (2, block, index)
        layers.setdefault(label, []).append(module)
        order[label] = rank
    return [(label, layers[label]) for label in sorted(layers, key=order.__getitem__)]


class XTIMethod(TextualInversionMethod):
    """Textual inversion with one set of token vectors per UNet cross-attention layer."""

    name = "textual_inversion_xti"

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.sample_prompts = getattr(args, "sample_prompts", None)
        self.layer_names: list[str] = []
        self.layer_states: torch.Tensor | None = None  # (L, B, T, D) of the batch being predicted

    def validate(self) -> None:
        if self.sample_prompts:
            raise ConfigError(
                "--sample_prompts: sample images are not drawn during XTI training (each UNet layer needs its own "
                "prompt encoding, which the samplers do not take); remove --sample_prompts"
            )
        super().validate()

    def setup(self, family: ModelFamily, models: LoadedModels) -> list[dict]:
        if family.id != "sd":
            raise ConfigError("XTI trains SD 1.x / 2.x UNets only")
        layers = cross_attention_layers(models.denoiser)
        if not layers:
            raise ConfigError("XTI needs a UNet with cross-attention layers; this model has none")
        self.layer_names = [label for label, _ in layers]
        for index, (_, modules) in enumerate(layers):
            for module in modules:
                module.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True)
        groups = super().setup(family, models)  # adds the tokens and an embedding of one vector set
        single = self.embedding
        vectors = single.vectors.detach()
        if vectors.ndim == 2:  # (N, D) from --init_word or random: the same start for every layer
            vectors = vectors.unsqueeze(0).repeat(len(layers), 1, 1)
        self.embedding = LayeredTokenEmbedding(single.base, vectors.clone())
        models.text_encoders[0].set_input_embeddings(self.embedding)
        logger.info("XTI: %d cross-attention layers (%s)", len(layers), ", ".join(self.layer_names))
        return [{**groups[0], "params": [self.embedding.vectors]}]

    def _layer_hook(self, index: int):
        def use_layer_states(module, args, kwargs):
            states = self.layer_states
            given = kwargs.get("encoder_hidden_states")
            if states is None or given is None:
                return None
            kwargs["encoder_hidden_states"] = states[index].to(given.device, given.dtype)
            return args, kwargs

        return use_layer_states

    def encode_conditioning(
        self, family: ModelFamily, models: LoadedModels, captions: list[str], batch: dict
    ) -> dict[str, torch.Tensor]:
        per_layer = []
        for index in range(len(self.layer_names)):
            self.embedding.layer = index
            per_layer.append(family.encode_conditioning(models, captions, batch)["encoder_hidden_states"])
        self.embedding.layer = 0
        self.layer_states = torch.stack(per_layer)  # (L, B, T, D)
        return {"encoder_hidden_states": per_layer[0]}

    vector_dims = 3  # the start vectors of --weights: (layers, vectors per token, width)

    @staticmethod
    def read_start_vectors(path: str) -> torch.Tensor:
        """(L, N, D) from an XTI file: one tensor per layer, named IN01 ... MID ... OUT11, in layer order."""
        if not path.lower().endswith(".safetensors"):
            raise CheckpointError(f"--weights {path}: XTI embeddings are read from .safetensors files")
        tensors = load_state_dict(path)
        if not tensors or not all(_LAYER_NAME.fullmatch(name) for name in tensors):
            raise CheckpointError(
                f"--weights {path}: not an XTI embedding (expected tensors IN01 ... MID ... OUT11, found "
                f"{', '.join(sorted(tensors)) or 'none'})"
            )
        return torch.stack([tensors[name] for name in sorted(tensors, key=_layer_rank)])

    def _initial_vectors(self, tokenizer, table: torch.Tensor) -> torch.Tensor:
        if self.start_vectors is None:
            return super()._initial_vectors(tokenizer, table)
        layers, _, width = self.start_vectors.shape
        if layers != len(self.layer_names) or width != table.shape[1]:
            raise ConfigError(
                f"--weights {self.options.weights} holds {layers} layers of width {width}; this model needs "
                f"{len(self.layer_names)} layers of width {table.shape[1]} (was it trained for another model?)"
            )
        return self.start_vectors.float().clone()

    def save(self, path: str, metadata: dict[str, str], unwrap) -> None:
        vectors = unwrap(self.embedding).vectors.detach().float().cpu()  # (L, N, D)
        dtype = SAVE_DTYPES[self.options.save_precision]
        if dtype is not None:
            vectors = vectors.to(dtype)
        tensors = {name: vectors[index].clone() for index, name in enumerate(self.layer_names)}
        if self.options.save_model_as == "safetensors":
            save_state_dict(tensors, path, metadata)
            return
        with atomic_path(path) as temp:
            torch.save(tensors, temp)

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "ss_xti_layers": ",".join(self.layer_names)}
