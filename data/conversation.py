"""Conversation templates (LLaVA-1.5's plain and vicuna_v1, Qwen2's ChatML) and the label masks of a sample.

    template = get_template("vicuna_v1")
    added = prepare_tokenizer(tokenizer, template)      # <image>, a distinct <pad>, chat_template; resize by `added`
    sample = tokenize_conversation(template, record["conversations"], tokenizer, sample_id=record["id"],
                                   num_images=1, image_seq_length=576, max_length=2048)
    prompt, _ = template.render([("user", "<image>\\nWhat is shown?")], add_generation_prompt=True)  # inference
    prompt_ids = tokenizer(prompt)["input_ids"]         # the tokenizer's own BOS, as in training

One template renders a conversation and knows where each supervised segment starts and ends in the text: what a
model writes after the generation prompt (the answer and its end-of-turn string). `tokenize_conversation`
tokenises the whole text once, as inference does, and maps those character spans onto tokens through the fast
tokenizer's offsets. A token with characters on both sides of a span boundary is an error, never a silently
zeroed sample (LLaVA's "tokenization mismatch ... (ignored)").
`chat_template` is the same format in Jinja: `apply_chat_template(messages, tokenize=False)` gives exactly
`render()`'s text. Tokenise that text with `tokenizer(text)`; `apply_chat_template(tokenize=True)` passes
add_special_tokens=False and so drops a BOS that training has (Llama-style tokenizers).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

import torch

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
LLAVA_ROLES = {"human": "user", "gpt": "assistant"}


class ConversationError(ValueError):
    """A sample that cannot become a training example; `.reason` is a short slug for counting rejects.

    reasons: malformed | image_count | template_mismatch | truncated_image | truncated_no_answer
    """

    def __init__(self, reason: str, detail: str, sample_id: str | None = None):
        self.reason, self.detail, self.sample_id = reason, detail, sample_id
        where = f"sample {sample_id}: " if sample_id is not None else ""
        super().__init__(f"{where}{detail} [{reason}]")

    def for_sample(self, sample_id: str) -> ConversationError:
        return ConversationError(self.reason, self.detail, sample_id)


def images_first(text: str, image_token: str = IMAGE_TOKEN) -> str:
    """LLaVA's preprocess_multimodal: every image token moves to the front of its turn, then "\\n" and the rest."""
    count = text.count(image_token)
    if count == 0:
        return text
    return (image_token * count + "\n" + text.replace(image_token, "").strip()).strip()


@dataclass(frozen=True)
class ConversationTemplate:
    """A chat format as data: what goes around the system prompt, each user turn and each assistant turn.

    An assistant turn renders as assistant_prefix + answer + end_of_turn + assistant_suffix. Its supervised span is
    what a model writes after the generation prompt (a prefix of assistant_prefix): the rest of the prefix (vicuna's
    " " before the answer), the answer and end_of_turn. An empty system prompt renders no system block.
    """
    name: str
    system: str
    end_of_turn: str
    system_prefix: str = ""
    system_suffix: str = ""
    user_prefix: str = ""
    user_suffix: str = ""
    assistant_prefix: str = ""
    assistant_suffix: str = ""
    generation_prompt: str = ""
    control_tokens: tuple[str, ...] = ()  # strings that must be single special tokens (prepare_tokenizer adds them)
    has_system: bool = True
    user_text_dropped: bool = False  # plain: the user turn is replaced by its image tokens (preprocess_plain)
    single_round: bool = False  # plain: one user turn and one answer
    image_token: str = IMAGE_TOKEN

    def __post_init__(self):
        if not self.assistant_prefix.startswith(self.generation_prompt):
            raise ValueError(f"template {self.name!r}: the generation prompt {self.generation_prompt!r} must begin "
                             f"the assistant prefix {self.assistant_prefix!r} (train and inference see one prompt)")

    def render(self, turns: list[tuple[str, str]], add_generation_prompt: bool = False
               ) -> tuple[str, list[tuple[int, int]]]:
        """(text, supervised character spans) of [(role, text)]; an optional first ("system", text) turn overrides
        the system prompt. User turns get their images moved to the front (LLaVA's preprocess_multimodal).
        Each span runs from the end of the generation prompt to the end of the end-of-turn string."""
        turns = list(turns)
        system = self.system
        if turns and turns[0][0] == "system":
            if not self.has_system:
                raise ConversationError("malformed", f"the {self.name} template has no system prompt")
            system, turns = turns[0][1], turns[1:]
        self._check_turns(turns, add_generation_prompt)
        text = self.system_prefix + system + self.system_suffix if system and self.has_system else ""
        spans: list[tuple[int, int]] = []
        for role, content in turns:
            if role == "user":
                content = images_first(content, self.image_token)
                if self.user_text_dropped:
                    content = self.image_token * content.count(self.image_token)
                text += self.user_prefix + content + self.user_suffix
            else:
                start = len(text) + len(self.generation_prompt)
                text += self.assistant_prefix + content + self.end_of_turn
                spans.append((start, len(text)))
                text += self.assistant_suffix
        if add_generation_prompt:
            text += self.generation_prompt
        return text, spans

    def _check_turns(self, turns: list[tuple[str, str]], add_generation_prompt: bool) -> None:
        if not turns:
            raise ConversationError("malformed", "no user or assistant turn")
        if self.single_round and len(turns) > 2:
            raise ConversationError("malformed", f"the {self.name} template takes one user turn and one answer, "
                                                 f"got {len(turns)} turns")
        for index, (role, content) in enumerate(turns):
            expected = "user" if index % 2 == 0 else "assistant"
            if role != expected:
                raise ConversationError("malformed", f"turn {index} is {role!r}, expected {expected!r} "
                                                     "(turns alternate user, assistant, starting with user)")
            if not isinstance(content, str):
                raise ConversationError("malformed", f"turn {index} is a {type(content).__name__}, not a string")
            if role == "assistant" and self.image_token in content:
                raise ConversationError("malformed", f"turn {index}: {self.image_token} in an assistant turn")
            if role == "user" and self.user_text_dropped and self.image_token not in content:
                raise ConversationError("image_count", f"the {self.name} template needs {self.image_token} in "
                                                       f"the user turn (turn {index})")
        if add_generation_prompt and turns[-1][0] != "user":
            raise ConversationError("malformed", "a generation prompt follows a user turn, not an assistant turn")

    @property
    def chat_template(self) -> str:
        """Jinja for tokenizer.apply_chat_template that renders exactly render()'s text (content: str or a list of
        {"type": "image"} / {"type": "text", "text": ...}; list items render as images first, texts joined by
        "\\n")."""
        s, img = _jinja_str, _jinja_str(self.image_token)
        user_text = f"{img} * text.count({img})" if self.user_text_dropped else "text"
        lines = [
            "{%- macro content_text(message) -%}",
            "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}",
            "{%- set parts = namespace(images=0, texts=[]) -%}",
            "{%- for item in message['content'] -%}",
            "{%- if item['type'] == 'image' -%}{%- set parts.images = parts.images + 1 -%}",
            "{%- elif item['type'] == 'text' -%}{%- set parts.texts = parts.texts + [item['text']] -%}",
            "{%- else -%}{{ raise_exception('unsupported content type ' ~ item['type']) }}{%- endif -%}",
            "{%- endfor -%}",
            f"{{{{ {img} * parts.images ~ parts.texts | join('\\n') }}}}",
            "{%- endif -%}",
            "{%- endmacro -%}",
            "{%- macro images_first(text) -%}",
            f"{{%- if text.count({img}) == 0 -%}}{{{{ text }}}}{{%- else -%}}",
            f"{{{{ ({img} * text.count({img}) ~ '\\n' ~ text.replace({img}, '').strip()).strip() }}}}",
            "{%- endif -%}",
            "{%- endmacro -%}",
            f"{{%- set state = namespace(system={s(self.system)}, expect='user') -%}}",
            "{%- set turns = messages -%}",
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{{ raise_exception('this template has no system prompt') }}" if not self.has_system else
            "{%- set state.system = content_text(messages[0]) -%}{%- set turns = messages[1:] -%}",
            "{%- endif -%}",
            "{%- if not turns -%}{{ raise_exception('no user or assistant turn') }}{%- endif -%}",
        ]
        if self.single_round:
            lines.append("{%- if turns | length > 2 -%}"
                         "{{ raise_exception('this template takes one user turn and one answer') }}{%- endif -%}")
        if self.has_system:
            lines.append(f"{{%- if state.system -%}}{{{{ {s(self.system_prefix)} ~ state.system ~ "
                         f"{s(self.system_suffix)} }}}}{{%- endif -%}}")
        lines += [
            "{%- for message in turns -%}",
            "{%- if message['role'] != state.expect -%}{{ raise_exception('turns alternate user, assistant, "
            "starting with user; got ' ~ message['role']) }}{%- endif -%}",
            "{%- if message['role'] == 'user' -%}",
            "{%- set text = images_first(content_text(message)) -%}",
            f"{{%- if text.count({img}) == 0 -%}}{{{{ raise_exception('this template needs an image in the user "
            "turn') }}{%- endif -%}" if self.user_text_dropped else "",
            f"{{{{ {s(self.user_prefix)} ~ {user_text} ~ {s(self.user_suffix)} }}}}",
            "{%- set state.expect = 'assistant' -%}",
            "{%- else -%}",
            "{%- set text = content_text(message) -%}",
            f"{{%- if {img} in text -%}}{{{{ raise_exception('an image in an assistant turn') }}}}{{%- endif -%}}",
            f"{{{{ {s(self.assistant_prefix)} ~ text ~ {s(self.end_of_turn)} ~ {s(self.assistant_suffix)} }}}}",
            "{%- set state.expect = 'user' -%}",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}",
            "{%- if state.expect != 'assistant' -%}"
            "{{ raise_exception('a generation prompt follows a user turn') }}{%- endif -%}",
            f"{{{{ {s(self.generation_prompt)} }}}}",
            "{%- endif -%}",
        ]
        return "\n".join(line for line in lines if line)


def _jinja_str(value: str) -> str:
    """A Jinja string literal (the lexer decodes backslash escapes; other characters pass through)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
CHATML_SYSTEM = "You are a helpful assistant."  # Qwen2's default

TEMPLATES: dict[str, ConversationTemplate] = {
    # LLaVA conv_llava_plain + preprocess_plain: "<image>" + caption + "\n"
    "plain": ConversationTemplate(name="plain", system="", end_of_turn="\n", has_system=False,
                                  user_text_dropped=True, single_round=True),
    # LLaVA conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>")
    "vicuna_v1": ConversationTemplate(name="vicuna_v1", system=VICUNA_SYSTEM, end_of_turn="</s>",
                                      system_suffix=" ", user_prefix="USER: ", user_suffix=" ",
                                      assistant_prefix="ASSISTANT: ", generation_prompt="ASSISTANT:",
                                      control_tokens=("</s>",)),
    # Qwen2 / SmolLM2 ChatML
    "chatml": ConversationTemplate(name="chatml", system=CHATML_SYSTEM, end_of_turn="<|im_end|>",
                                   system_prefix="<|im_start|>system\n", system_suffix="<|im_end|>\n",
                                   user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>\n",
                                   assistant_prefix="<|im_start|>assistant\n", assistant_suffix="\n",
                                   generation_prompt="<|im_start|>assistant\n",
                                   control_tokens=("<|im_start|>", "<|im_end|>")),
}


def get_template(name: str, system: str | None = None) -> ConversationTemplate:
    """The named template; `system` replaces its default system prompt ("" for none)."""
    if name not in TEMPLATES:
        close = difflib.get_close_matches(name, TEMPLATES, n=1, cutoff=0.3)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown conversation template {name!r}; {hint}choose from {', '.join(TEMPLATES)}")
    template = TEMPLATES[name]
    if system is None:
        return template
    if not template.has_system:
        raise ValueError(f"the {name!r} template has no system prompt; drop the system override")
    return replace(template, system=system)


def _with_image_token(template: ConversationTemplate, image_token: str) -> ConversationTemplate:
    return template if template.image_token == image_token else replace(template, image_token=image_token)


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is a slow tokenizer: the label masks need a fast one "
                         "(tokenizer.json) for its offset mapping")


def _special_token_id(tokenizer, token: str) -> int | None:
    """The id of `token` if the tokenizer never splits it (a special added token), else None."""
    token_id = tokenizer.added_tokens_encoder.get(token)
    if token_id is None or not tokenizer.added_tokens_decoder[token_id].special:
        return None
    return token_id


def prepare_tokenizer(tokenizer, template: ConversationTemplate, image_token: str = IMAGE_TOKEN) -> int:
    """Ready a fast tokenizer for the template; returns how many tokens were added (resize the embeddings).

    Adds the image token and the template's control tokens ("</s>", "<|im_start|>", "<|im_end|>") as special
    tokens where missing, a distinct "<pad>" when pad is unset or equals eos / the end-of-turn token (a collator
    that masks attention where input == pad would otherwise hide real end-of-turn tokens), the template's
    chat_template, and right padding for training.
    """
    _require_fast(tokenizer)
    template = _with_image_token(template, image_token)
    before = len(tokenizer)
    missing = [t for t in (image_token, *template.control_tokens) if _special_token_id(tokenizer, t) is None]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    pad = tokenizer.pad_token
    if pad is None or pad == tokenizer.eos_token or pad == template.end_of_turn:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.chat_template = template.chat_template
    tokenizer.padding_side = "right"
    return len(tokenizer) - before


def end_of_turn_id(tokenizer, template: ConversationTemplate) -> int | None:
    """The token id generation stops at (the end-of-turn token), or None where it is not one special token."""
    return _special_token_id(tokenizer, template.end_of_turn)


def llava_turns(conversations: list[dict], sample_id: str) -> list[tuple[str, str]]:
    """LLaVA JSON [{"from": "human" | "gpt", "value": str}] -> [(role, text)], images moved to the front of
    their turn (preprocess_multimodal); a leading gpt turn is dropped as LLaVA's preprocess does."""
    def malformed(detail: str) -> ConversationError:
        return ConversationError("malformed", detail, sample_id)

    if not isinstance(conversations, list) or not conversations:
        raise malformed("conversations must be a non-empty list")
    turns: list[tuple[int, str, str]] = []  # (index in the JSON, role, text)
    for index, message in enumerate(conversations):
        if not isinstance(message, dict) or "from" not in message or "value" not in message:
            raise malformed(f"turn {index} is not a {{'from', 'value'}} object")
        if message["from"] not in LLAVA_ROLES:
            raise malformed(f"turn {index}: unknown role {message['from']!r} (human | gpt)")
        value = message["value"]
        if not isinstance(value, str):
            raise malformed(f"turn {index}: value is a {type(value).__name__}, not a string")
        if not value.strip():  # LLaVA's get_prompt renders an empty message as a bare "ROLE:" tag
            raise malformed(f"turn {index}: empty value")
        turns.append((index, LLAVA_ROLES[message["from"]], value))
    if turns[0][1] == "assistant":
        turns = turns[1:]
    if not turns:
        raise malformed("no human turn")
    for position, (index, role, value) in enumerate(turns):
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            raise malformed(f"turn {index}: two {'human' if role == 'user' else 'gpt'} turns in a row")
        if role == "assistant" and IMAGE_TOKEN in value:
            raise malformed(f"turn {index}: {IMAGE_TOKEN} in a gpt turn")
    return [(role, images_first(value) if role == "user" else value) for _, role, value in turns]


def _supervised_tokens(text: str, spans: list[tuple[int, int]], offsets: list[tuple[int, int]], tokens: list[str],
                       sample_id: str) -> list[bool]:
    """Per token: do its characters lie inside a supervised span? A token with characters on both sides of a span
    boundary means the training text tokenises differently from the generation prompt: an error."""
    inside = [0] * (len(text) + 1)  # prefix counts of characters inside a span
    for start, end in spans:
        for position in range(start, end):
            inside[position + 1] = 1
    for position in range(len(text)):
        inside[position + 1] += inside[position]
    supervised = []
    for (start, end), token in zip(offsets, tokens):
        hits = inside[end] - inside[start]
        if 0 < hits < end - start:
            raise ConversationError("template_mismatch", f"token {token!r} covers {text[start:end]!r} across a "
                                    "supervised span boundary: the tokenizer merges across the template's turn "
                                    "boundary", sample_id)
        supervised.append(end > start and hits == end - start)  # BOS and other added tokens: offsets (0, 0)
    return supervised


def tokenize_conversation(template: ConversationTemplate, conversations: list[dict], tokenizer, *, sample_id: str,
                          num_images: int, image_seq_length: int, max_length: int,
                          image_token: str = IMAGE_TOKEN) -> dict[str, torch.Tensor]:
    """{"input_ids": (T,), "labels": (T,)} of one LLaVA-JSON conversation; labels are -100 except on answers and
    their end-of-turn tokens. Each image token becomes image_seq_length copies; T <= max_length."""
    _require_fast(tokenizer)
    template = _with_image_token(template, image_token)
    image_id = _special_token_id(tokenizer, image_token)
    unprepared = [t for t in (image_token, *template.control_tokens) if _special_token_id(tokenizer, t) is None]
    if unprepared:
        raise ValueError(f"{', '.join(unprepared)} must be single special tokens of the tokenizer: call "
                         "data.conversation.prepare_tokenizer(tokenizer, template) and resize the embeddings")
    turns = llava_turns(conversations, sample_id)
    if turns[-1][0] != "assistant":
        raise ConversationError("malformed", "the conversation ends with a human turn", sample_id)
    try:
        text, spans = template.render(turns)
    except ConversationError as error:
        raise error.for_sample(sample_id) from None
    found = text.count(image_token)
    if found != num_images:
        raise ConversationError("image_count", f"{found} {image_token} in the conversation, {num_images} "
                                f"image(s) in the sample", sample_id)

    encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    supervised = _supervised_tokens(text, spans, encoding["offset_mapping"], tokenizer.convert_ids_to_tokens(ids),
                                    sample_id)
    input_ids: list[int] = []
    labels: list[int] = []
    image_positions: list[int] = []
    for token_id, is_answer in zip(ids, supervised):
        if token_id == image_id:
            image_positions.append(len(input_ids))
            input_ids += [image_id] * image_seq_length
            labels += [IGNORE_INDEX] * image_seq_length
        else:
            input_ids.append(token_id)
            labels.append(token_id if is_answer else IGNORE_INDEX)
    full_length = len(input_ids)
    if full_length > max_length:
        if image_positions and image_positions[-1] + image_seq_length > max_length:
            raise ConversationError("truncated_image", f"max_length {max_length} cuts into the image tokens "
                                    f"(they end at {image_positions[-1] + image_seq_length})", sample_id)
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise ConversationError("truncated_no_answer", f"no answer token within max_length {max_length} "
                                    f"(the sample has {full_length} tokens)", sample_id)
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}
