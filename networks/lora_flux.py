"""`--network_module networks.lora_flux`: the name the reference trainer's FLUX.1 LoRA module has, kept so users'
commands work. It is networks.lora itself; the FLUX family's target table supplies the BFL module names, the fused
q|k|v split points and its --network_args (img_attn_dim ..., in_dims, train_double_block_indices,
train_single_block_indices, train_t5xxl; split_qkv, save_format, network_reg_dims and network_reg_lrs are shared).
"""

from networks.lora import LoRANetwork, create_network, create_network_from_weights

__all__ = ["LoRANetwork", "create_network", "create_network_from_weights"]
