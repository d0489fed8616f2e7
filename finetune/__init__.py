"""Preprocessing tools for fine-tuning data: captioning, tagging, metadata merge and clean, bucket latents."""
