"""Tiny random-weight checkpoints built with transformers, the reference the tests compare against.

`build_tiny_vlm` writes an Idefics3 (SmolVLM v1) or SmolVLM (v2) checkpoint in the Hugging Face layout: config.json,
model.safetensors, tokenizer files, processor files and the chat template, exactly as `save_pretrained` writes them.
`build_tiny_llama` writes a text-only Llama checkpoint with the same tokenizer.

The tokenizer is a byte-level BPE trained here on a few paragraphs of English, laid out like SmolLM2's: the first ids
are `<|endoftext|>` (0), `<|im_start|>` (1), `<|im_end|>` (2); the image tokens are added after the base vocabulary.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Describe this image in detail. What is in the picture? There is a cat sitting on a red chair.
The sky is blue and the sun is shining over the green hills. Two children play in the park.
A small boat sails across the calm lake at sunset, and birds fly above the water.
The old house stands at the end of the street; its windows are dark and its door is open.
Can you tell me what you see? I see a table with three cups, a book and a lamp.
This photograph shows a busy market with people buying fruit, bread and flowers.
The mountain is covered with snow, and a narrow path leads up to the top.
Answer the question about the image. How many dogs are there? There are 3 dogs.
The train leaves the station at 10:45 and arrives in the city two hours later.
She wrote a letter to her friend and sent it by mail on Monday morning.
Numbers like 2024, 3.14 and 1,000 appear in text, and so do emails and names.
User: Hello! Assistant: Hi, how can I help you today? User: Tell me a story.
Once upon a time there was a little robot who wanted to learn how to paint.
"""

BASE_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
IMAGE_SPECIAL = ["<global-img>", *ROW_COL, "<fake_token_around_image>", "<image>", "<end_of_utterance>"]
VOCAB_SIZE = 384  # base vocabulary (256 bytes + 3 specials + merges); the image tokens come after it

# The released SmolVLM chat template (HuggingFaceTB/SmolVLM-256M-Instruct on the Hugging Face Hub).
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

LLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Vision tower: 64x64 images in 8x8 patches, pixel shuffle by 2 -> (64/8)^2 / 2^2 = 16 tokens per image.
IMAGE_SIZE, PATCH_SIZE, SCALE_FACTOR = 64, 8, 2
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
LONGEST_EDGE = 192


def train_backend_tokenizer():
    """A byte-level BPE like SmolLM2's (digits split one by one), plus the image tokens as added special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=BASE_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.add_special_tokens(IMAGE_SPECIAL)
    return tok


def build_hf_tokenizer(padding_side: str = "left", eos_token: str = "<end_of_utterance>"):
    """transformers' PreTrainedTokenizerFast around the trained backend, with SmolVLM's special tokens
    (SmolLM2's eos <|im_end|> for the text-only model)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_backend_tokenizer(),
        bos_token="<|im_start|>",
        eos_token=eos_token,
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        padding_side=padding_side,
        model_max_length=8192,
    )


def _image_processor(model_type: str):
    from transformers import Idefics3ImageProcessorPil, SmolVLMImageProcessorPil

    cls = Idefics3ImageProcessorPil if model_type == "idefics3" else SmolVLMImageProcessorPil
    return cls(
        size={"longest_edge": LONGEST_EDGE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=True,
    )


def _ensure_num2words():
    """SmolVLMProcessor refuses to build without num2words (it only uses it for video prompts): stub it if absent."""
    import transformers.models.smolvlm.processing_smolvlm as smolvlm_processing

    if smolvlm_processing.num2words is None:
        smolvlm_processing.num2words = str


@contextmanager
def _video_processor_unchecked():
    """Without torchvision, transformers' VIDEO_PROCESSOR_MAPPING is a dummy and SmolVLMProcessor's type check of its
    video_processor argument crashes; skip that one check while the processor is built."""
    from transformers import SmolVLMProcessor

    base_check = SmolVLMProcessor.check_argument_for_proper_class

    def check(self, name, arg):
        return type(arg) if name == "video_processor" else base_check(self, name, arg)

    SmolVLMProcessor.check_argument_for_proper_class = check
    try:
        yield
    finally:
        del SmolVLMProcessor.check_argument_for_proper_class


def _smolvlm_processor(image_processor, tokenizer, image_seq_len: int, chat_template: str):
    from transformers import SmolVLMProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    _ensure_num2words()
    video_processor = SmolVLMVideoProcessor(size={"longest_edge": LONGEST_EDGE},
                                            max_image_size={"longest_edge": IMAGE_SIZE})
    with _video_processor_unchecked():
        return SmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                                image_seq_len=image_seq_len, chat_template=chat_template)


def build_hf_processor(model_type: str, tokenizer=None):
    """The reference processor (PIL image backend: the default one needs torchvision)."""
    tokenizer = tokenizer if tokenizer is not None else build_hf_tokenizer()
    image_processor = _image_processor(model_type)
    if model_type == "idefics3":
        from transformers import Idefics3Processor

        return Idefics3Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_len=IMAGE_SEQ_LEN,
            chat_template=SMOLVLM_CHAT_TEMPLATE,
        )
    if model_type == "smolvlm":
        return _smolvlm_processor(image_processor, tokenizer, IMAGE_SEQ_LEN, SMOLVLM_CHAT_TEMPLATE)
    raise ValueError(f"model_type must be 'idefics3' or 'smolvlm', got {model_type!r}")


def load_hf_processor(path, model_type: str):
    """Load the reference processor back from a saved dir, with the PIL image processor."""
    from transformers import AutoTokenizer, Idefics3ImageProcessorPil, SmolVLMImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(path)
    ip_cls = Idefics3ImageProcessorPil if model_type == "idefics3" else SmolVLMImageProcessorPil
    image_processor = ip_cls.from_pretrained(path)
    config = json.loads((Path(path) / "processor_config.json").read_text())
    chat_template = (Path(path) / "chat_template.jinja").read_text()
    if model_type == "idefics3":
        from transformers import Idefics3Processor

        return Idefics3Processor(image_processor, tokenizer, image_seq_len=config["image_seq_len"],
                                 chat_template=chat_template)
    return _smolvlm_processor(image_processor, tokenizer, config["image_seq_len"], chat_template)


def _vlm_config(model_type: str, tokenizer):
    from transformers import Idefics3Config, SmolVLMConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=len(tokenizer),
                rope_theta=10000.0, max_position_embeddings=2048, rms_norm_eps=1e-5,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    cls = Idefics3Config if model_type == "idefics3" else SmolVLMConfig
    return cls(vision_config=vision, text_config=text, scale_factor=SCALE_FACTOR,
               image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
               pad_token_id=tokenizer.pad_token_id)


@torch.no_grad()
def widen_weights(model, seed: int, std: float = 0.3):
    """Re-draw every weight matrix and embedding from N(0, std) so the logits are far from flat."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if param.ndim >= 2:
            param.copy_(torch.randn(param.shape, generator=gen) * std)
        elif name.endswith("bias"):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        else:  # norm weights
            param.copy_(1.0 + torch.randn(param.shape, generator=gen) * 0.1)


def _save_generation_config(model, tokenizer):
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def build_tiny_vlm(out_dir, model_type: str = "idefics3", dtype=torch.float32, seed: int = 0,
                   std: float = 0.3) -> Path:
    """Write a tiny random Idefics3/SmolVLM checkpoint with its processor to out_dir and return the path; std: of
    its weight matrices (widen_weights)."""
    from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

    out_dir = Path(out_dir)
    processor = build_hf_processor(model_type)
    tokenizer = processor.tokenizer
    config = _vlm_config(model_type, tokenizer)
    cls = Idefics3ForConditionalGeneration if model_type == "idefics3" else SmolVLMForConditionalGeneration
    return _save_random_model(cls, config, tokenizer, processor, out_dir, dtype, seed, std)


def build_tiny_llama(out_dir, dtype=torch.float32, seed: int = 0) -> Path:
    """Write a tiny random text-only Llama checkpoint with the same vocabulary, a ChatML template and eos <|im_end|>
    (= pad, as in SmolLM2-Instruct)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_hf_tokenizer(eos_token="<|im_end|>")
    tokenizer.chat_template = LLAMA_CHAT_TEMPLATE
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=len(tokenizer), rope_theta=10000.0,
                         max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return _save_random_model(LlamaForCausalLM, config, tokenizer, tokenizer, out_dir, dtype, seed)


def _save_random_model(cls, config, tokenizer, files, out_dir: Path, dtype, seed: int, std: float = 0.3) -> Path:
    """A seeded, widened random `cls(config)` saved in `dtype` beside `files` (the processor or the tokenizer)."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    widen_weights(model, seed, std)
    _save_generation_config(model, tokenizer)
    model.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    files.save_pretrained(out_dir)
    return out_dir
