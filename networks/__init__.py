"""Trainable adapter networks (LoRA and friends) and LoRA tools."""
