"""Adapter targets shared by the families, the adapter networks and the LoRA tools."""
