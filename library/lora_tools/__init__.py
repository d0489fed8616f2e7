"""The LoRA tools behind `networks/<tool>.py`: merge into a model, merge several, SVD-merge, resize, extract, check and
convert. Every tool works for every family through the family's adapter-target table and the adapter-type interface
(networks/adapters.py); nothing here names a family."""
