"""Model code: plain PyTorch / transformers, no Ray imports."""
