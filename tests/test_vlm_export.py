"""The VLM export is a stock transformers Llava folder: a fresh process that imports no clipdino module loads it
with from_pretrained + AutoProcessor and reproduces the training model's logits, prompt tokens and greedy answer."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import REPO
from vlm_fixtures import make_encoder_export, make_llava_data

FRESH = r'''
import json, sys, torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
folder, image, question = sys.argv[1:4]
model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits[0, -1]
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("models", "train", "data", "eval", "kernels", "launch"))
print(json.dumps({"prompt": prompt, "input_ids": inputs["input_ids"][0].tolist(), "logits": logits.tolist(),
                  "generated": generated.tolist(), "pixel_values": inputs["pixel_values"].flatten().tolist(),
                  "clipdino_modules": ours}))
'''


def _objective(tmp_path, llm: str, template: str, encoder):
    from train.config_loader import load_config
    from train.objectives.vlm import VLMObjective
    from train.vlm_config import VLM_CHOICES, VLMConfig

    data = make_llava_data(tmp_path / "data", records=4, text_only=0)
    cfg = load_config(REPO / "launch/configs/vlm/tiny_stage2.yaml",
                      [f"model.vision={encoder}", f"model.llm={llm}", f"data.template={template}",
                       f"data.train={data['stage2']}", "model.projector_from="], cls=VLMConfig, choices=VLM_CHOICES)
    return VLMObjective(cfg, 1, 1), data


@pytest.mark.parametrize("llm,template", [("tiny-llama", "vicuna_v1"), ("tiny-qwen2", "chatml")])
def test_export_loads_in_a_fresh_process_and_matches(tmp_path, llm, template):
    encoder = make_encoder_export(tmp_path / "encoder")
    objective, data = _objective(tmp_path, llm, template, encoder)
    with torch.no_grad():  # a trained-looking projector, so the comparison is not between two near-zero maps
        for p in objective.llava.model.multi_modal_projector.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    export = tmp_path / "export" / "step_0000001"
    objective.write_export(None, export, {"step": 1}, zero_stage=0, is_main=True)
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in export.iterdir()}
    assert json.loads((export / "tokenizer_config.json").read_text())["padding_side"] == "left"
    assert objective.processor.tokenizer.padding_side == "right"  # training keeps padding on the right
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "llava" and config["vision_config"]["model_type"] == "clip_vision_model"
    image, question = data["images"] / "00000.png", "What colour is the shape?"
    out = subprocess.run([sys.executable, "-c", FRESH, str(export), str(image), question], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    assert fresh["clipdino_modules"] == []

    # the prompt tokens a stock processor makes = the prefix our training tokenisation makes (image tokens expanded)
    from data.conversation import tokenize_conversation

    sample = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "red"}]
    ours = tokenize_conversation(objective.template, sample, objective.processor.tokenizer, sample_id="t",
                                 num_images=1, image_seq_length=objective.llava.config.image_seq_length,
                                 max_length=512)["input_ids"].tolist()
    assert ours[: len(fresh["input_ids"])] == fresh["input_ids"]

    # the training model's logits and greedy answer, on the same inputs
    ids = torch.tensor([fresh["input_ids"]])
    pixels = torch.tensor(fresh["pixel_values"]).reshape(1, 3, 32, 32)
    ours_pixels = objective.processor.image_processor(Image.open(image), return_tensors="pt")["pixel_values"]
    assert torch.allclose(ours_pixels, pixels, atol=1e-6)
    model = objective.llava.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits[0, -1]
        generated = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                   max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    assert torch.allclose(logits, torch.tensor(fresh["logits"]), atol=1e-5, rtol=1e-5)
    assert generated.tolist() == fresh["generated"]


def test_a_vit_without_ln_pre_maps_onto_a_native_tower_and_registers_are_refused(tmp_path):
    from models.vlm import build_llava

    model, _ = build_llava(str(make_encoder_export(tmp_path / "vit", pre_norm=False)), "tiny-llama")
    assert model.config.vision_config.model_type == "vit"
    with pytest.raises(ValueError, match="num_registers"):
        build_llava(str(make_encoder_export(tmp_path / "reg", pre_norm=False, num_registers=2)), "tiny-llama")


def test_the_linear_projector_is_one_trainable_linear(tmp_path):
    from models.vlm import build_llava, set_trainable

    model, _ = build_llava(str(make_encoder_export(tmp_path / "enc")), "tiny-llama", projector="linear")
    set_trainable(model, {"projector"})
    projector = model.model.multi_modal_projector
    assert [n for n, p in projector.named_parameters() if p.requires_grad] == ["linear_1.weight", "linear_1.bias"]
    x = torch.randn(2, 5, projector.linear_1.in_features)
    assert torch.allclose(projector(x), projector.linear_1(x), atol=1e-6)


def test_training_step_equals_llavas_own_forward_and_ignores_text_only_images(tmp_path):
    """Our step's loss = Llava's forward with labels on an all-image batch; a text-only sample's zero image changes
    nothing but keeps the tower and projector in the graph (weight 0)."""
    from data.conversation import get_template, tokenize_conversation
    from data.vlm_data import collate
    from models.vlm import build_llava
    from train.objectives.vlm import LlavaTrainingStep

    model, processor = build_llava(str(make_encoder_export(tmp_path / "enc")), "tiny-qwen2", template="chatml")
    template, n = get_template("chatml"), model.config.image_seq_length
    image = processor.image_processor(Image.new("RGB", (40, 30), (200, 10, 10)), return_tensors="pt")["pixel_values"][0]

    def item(conv, has_image):
        tok = tokenize_conversation(template, conv, processor.tokenizer, sample_id="t", num_images=int(has_image),
                                    image_seq_length=n, max_length=512)
        return {"id": "t", **tok, "pixel_values": image if has_image else torch.zeros_like(image),
                "has_image": has_image}

    with_image = item([{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}], True)
    text_only = item([{"from": "human", "value": "Two plus two?"}, {"from": "gpt", "value": "4"}], False)
    step = LlavaTrainingStep(model)
    b = collate([with_image], processor.tokenizer.pad_token_id)
    loss, supervised = step(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"], b["has_image"])
    reference = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"],
                      labels=b["labels"]).loss
    assert torch.allclose(loss, reference, atol=1e-6) and supervised == (b["labels"] != -100).sum()
    mixed = collate([with_image, text_only], processor.tokenizer.pad_token_id)
    loss, _ = step(mixed["input_ids"], mixed["attention_mask"], mixed["labels"], mixed["pixel_values"],
                   mixed["has_image"])
    loss.backward()
    assert all(p.grad is not None for p in model.model.multi_modal_projector.parameters())
    assert model.model.vision_tower.embeddings.patch_embedding.weight.grad is not None  # layers up to -2 ran


def test_unfreezing_the_tower_gives_it_its_own_lr(tmp_path):
    from train.config_loader import load_config
    from train.objectives.vlm import VLMObjective
    from train.optim import param_groups
    from train.vlm_config import VLM_CHOICES, VLMConfig

    data = make_llava_data(tmp_path / "data", records=2, text_only=0)
    cfg = load_config(REPO / "launch/configs/vlm/tiny_stage2.yaml",
                      [f"model.vision={make_encoder_export(tmp_path / 'enc')}", "model.llm=tiny-llama",
                       f"data.train={data['stage2']}", "model.projector_from=", "model.train=projector,llm,vision",
                       "model.vision_lr=2e-6"], cls=VLMConfig, choices=VLM_CHOICES)
    objective = VLMObjective(cfg, 1, 1)
    groups = param_groups(objective.student, 0.0, objective.no_weight_decay_names(), objective.group_of)
    scales = {g["name"]: objective.lr_scale(g["name"], 0) for g in groups}
    assert scales["vision/decay"] == pytest.approx(2e-6 / 2e-5) and scales["default/decay"] == 1.0
    tower = {id(p) for p in objective.llava.model.vision_tower.parameters()}
    assert all(id(p) in tower for g in groups if g["name"].startswith("vision") for p in g["params"])
    from train.vlm_config import trainable_parts

    with pytest.raises(ValueError, match="model.train"):
        trainable_parts("llm")  # the projector always trains


def test_an_llm_from_a_folder_trains_with_gradient_checkpointing(tmp_path):
    """from_pretrained leaves a model in eval mode, where HF skips gradient checkpointing: the objective must not."""
    from models.llm import build_tiny_llm
    from train.config_loader import load_config
    from train.objectives.vlm import VLMObjective
    from train.vlm_config import VLM_CHOICES, VLMConfig

    lm, tokenizer = build_tiny_llm("tiny-llama")
    lm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    data = make_llava_data(tmp_path / "data", records=2, text_only=0)
    cfg = load_config(REPO / "launch/configs/vlm/tiny_stage2.yaml",
                      [f"model.vision={make_encoder_export(tmp_path / 'enc')}", f"model.llm={tmp_path / 'llm'}",
                       f"data.train={data['stage2']}", "model.projector_from=", "model.grad_checkpointing=true"],
                      cls=VLMConfig, choices=VLM_CHOICES)
    objective = VLMObjective(cfg, 1, 1)
    objective.configure_grad_checkpointing()
    language_model = objective.llava.model.language_model
    assert language_model.training and language_model.gradient_checkpointing


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "launch/configs/vlm").glob("*.yaml")))
def test_shipped_vlm_configs_load(name, monkeypatch):
    from train.config_loader import load_config
    from train.vlm_config import VLM_CHOICES, VLMConfig

    for var in ("ENCODER", "VICUNA_DIR", "QWEN2_DIR", "LLAVA_DATA", "VMCBENCH_DIR"):
        monkeypatch.setenv(var, f"/{var.lower()}")
    cfg = load_config(REPO / "launch/configs/vlm" / name, cls=VLMConfig, choices=VLM_CHOICES)
    if name.startswith("llava15"):  # LLaVA-1.5's published numbers
        stage2 = "stage2" in name
        assert (cfg.optim.lr, cfg.schedule.global_batch, cfg.deepspeed.zero_stage) == (
            (2e-5, 128, 3) if stage2 else (1e-3, 256, 2))
        assert cfg.schedule.epochs == 1 and cfg.schedule.warmup_epochs == 0.03 and cfg.optim.weight_decay == 0
        assert cfg.data.max_length == 2048 and cfg.model.grad_checkpointing and cfg.model.vision_layer == -2
        assert cfg.data.group_by_modality_length == stage2 and cfg.data.image_aspect_ratio == (
            "pad" if stage2 else "square")
        assert cfg.data.template == ("plain" if not stage2 else "vicuna_v1" if "vicuna" in name else "chatml")


def test_projector_from_refuses_the_other_projector_kind(tmp_path):
    """An mlp2x_gelu projector and a linear one have the same shapes: the kind is compared, not guessed."""
    from models.vlm import build_llava, load_projector

    encoder = make_encoder_export(tmp_path / "enc")
    objective, _ = _objective(tmp_path, "tiny-llama", "vicuna_v1", encoder)
    objective.write_export(None, tmp_path / "stage1" / "export" / "step_0000001", {"step": 1}, zero_stage=0,
                           is_main=True)
    same, _ = build_llava(str(encoder), "tiny-llama", template="vicuna_v1")
    assert load_projector(same, str(tmp_path / "stage1")).endswith("step_0000001")
    assert torch.equal(same.model.multi_modal_projector.linear_1.weight,
                       objective.llava.model.multi_modal_projector.linear_1.weight)
    linear, _ = build_llava(str(encoder), "tiny-llama", template="vicuna_v1", projector="linear")
    with pytest.raises(ValueError, match="its projector is mlp2x_gelu, this model's is linear"):
        load_projector(linear, str(tmp_path / "stage1"))
