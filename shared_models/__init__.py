"""Super-resolution networks, losses, metrics and checkpoints shared by client and server (pure PyTorch + MONAI)."""
