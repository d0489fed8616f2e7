"""Caption text handling shared by the model families (weighted captions)."""
