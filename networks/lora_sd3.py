"""`--network_module networks.lora_sd3` (the SD3 family's default): the name the reference trainer's SD3 / SD3.5 LoRA
module has, kept so users' commands work. It is networks.lora; the SD3 family's target table supplies the SAI module
names, the fused q|k|v split points and its --network_args (context_attn_dim ... x_mod_dim, emb_dims,
train_block_indices, train_t5xxl; verbose, split_qkv, save_format, network_reg_dims and network_reg_lrs are shared).
"""

from networks.lora import LoRANetwork, create_network, create_network_from_weights

__all__ = ["LoRANetwork", "create_network", "create_network_from_weights"]
