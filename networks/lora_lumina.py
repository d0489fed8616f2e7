"""`--network_module networks.lora_lumina`: the name the reference trainer's Lumina Image 2.0 LoRA module has, kept
so users' commands work. It is networks.lora itself; the Lumina family's target table supplies the released module
names (`lora_unet_layers_0_attention_qkv` ...), the fused q|k|v split points, Gemma2's layers (`lora_te_...`) and its
--network_args (attn_dim, mlp_dim, mod_dim, refiner_dim, embedder_dims, train_block_indices, verbose; split_qkv,
save_format, network_reg_dims and network_reg_lrs are shared).
"""

from networks.lora import LoRANetwork, create_network, create_network_from_weights

__all__ = ["LoRANetwork", "create_network", "create_network_from_weights"]
