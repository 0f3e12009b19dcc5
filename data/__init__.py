"""Data: synthetic image-caption world, webdataset loader, transforms, tokenizers."""
