"""Plain PyTorch models: ViT, CLIP text tower, DINO head, frozen HF text tower, analytic FLOPs."""
