"""Converters that load foreign checkpoints into clipdino models and exports (docs/eval.md, "Importing").

    open_clip.py   open_clip CLIP state dicts            -> clip export
    timm_vit.py    timm ViTs, the original DINO release  -> vit export
    hf_clip.py     Hugging Face CLIPModel / CLIPVisionModel -> clip / vit export
    hf_vit.py      Hugging Face ViTModel                  -> vit export
    init_from.py   an export's vision tower as pretraining initialisation
    common.py      safe weight reading, strict loading with source-named key errors
"""
