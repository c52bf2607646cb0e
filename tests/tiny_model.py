"""A tiny, deterministic Llama + byte-level BPE tokenizer for tests (no hub, no internet).

``build_tiny_model(path)`` writes a complete Hugging Face model directory (config,
safetensors weights, tokenizer files with a ChatML chat template) in well under a second.
``teach_tiny_model(path, texts, steps)`` overfits it on a few texts so that it answers
known prompts with EOS-terminated continuations of different lengths, which is what
early-stopping tests need (a random model never emits EOS). ``build_lora_adapter(model_dir,
path, seed=…)`` saves a LoRA adapter of it with random weights (each seed answers differently).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS = "<|im_end|>"
PAD = "<pad>"
SPECIAL_TOKENS = [BOS, IM_START, EOS, PAD]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Question/answer pairs double as tokenizer corpus and as teaching material.
QA_PAIRS: list[tuple[str, str]] = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of Germany?", "Berlin"),
    ("How many legs does a spider have?", "Eight"),
    ("What color is the sky on a clear day?", "The sky is blue."),
    ("What is two plus two?", "Four"),
    ("Which planet is known as the red planet?", "Mars is known as the red planet."),
    ("What do bees make?", "Bees make honey from the nectar of flowers."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote it a long time ago in England."),
    ("What is frozen water called?", "Ice"),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What gas do plants absorb?", "Plants absorb carbon dioxide and release oxygen into the air."),
    ("What is the boiling point of water?", "One hundred degrees Celsius at sea level."),
]

CORPUS: list[str] = [
    "The quick brown fox jumps over the lazy dog.",
    "Most people begin the morning with a small routine that helps them wake up.",
    "Some make a cup of coffee or tea, while others prefer a glass of water and a short walk.",
    "The river runs through the old town, past the market and the stone bridge.",
    "Scientists study the stars to learn how the universe began and how it changes.",
    "A good recipe lists the ingredients first and then explains each step in order.",
    "In the spring the garden fills with flowers, and the bees come back to work.",
    "The team trained every day for the match, and the crowd cheered when they won.",
    "Computers follow instructions written by programmers in many different languages.",
    "History teaches us how people lived, what they believed and why things changed.",
    "The mountain was covered with snow, and the air was cold and very clear.",
    "Please answer the question in one short sentence.",
    "List three colors: red, green and blue.",
] + [f"Question: {q}\nAnswer: {a}" for q, a in QA_PAIRS]


def _train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeating the corpus changes no merge order but makes pair counts less tie-prone.
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(path: Path, *, seed: int = 0, max_position_embeddings: int = 512) -> Path:
    """Build and save a tiny random Llama with a trained byte-level BPE tokenizer at ``path``.

    Deterministic for a given ``seed``. The context is deliberately small (512 positions by
    default, settable) so tests can exercise windowed scoring with short inputs.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size=512)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, like the real small models
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def qa_texts(pairs: Sequence[tuple[str, str]] = QA_PAIRS) -> list[str]:
    """Plain-format training texts ``"Question: q\\nAnswer: a"`` (the trainer appends EOS)."""
    return [f"Question: {q}\nAnswer: {a}" for q, a in pairs]


def teach_tiny_model(
    path: Path, texts: Sequence[str], steps: int = 80, *, seed: int = 0, lr: float = 1e-2
) -> Path:
    """Overfit the model at ``path`` on ``texts`` (each followed by EOS) and save it back.

    Full-batch AdamW on a 2-layer model, ~2 s. Afterwards the model continues each
    training prompt with its text and stops with EOS.
    """
    path = Path(path)
    threads = torch.get_num_threads()
    # Ops this small gain nothing from threads, and on a busy machine OpenMP threads
    # spinning against other processes made this 10x slower.
    torch.set_num_threads(1)
    try:
        _teach(path, texts, steps, seed, lr)
    finally:
        torch.set_num_threads(threads)
    return path


def _teach(path: Path, texts: Sequence[str], steps: int, seed: int, lr: float) -> None:
    torch.manual_seed(seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    seqs = [
        tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for t in texts
    ]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        optim.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optim.step()
    model.eval()
    model.save_pretrained(path, safe_serialization=True)


if __name__ == "__main__":  # pragma: no cover - manual helper: python -m tests.tiny_model /tmp/tiny
    import sys

    out = build_tiny_model(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny"))
    if "--teach" in sys.argv:
        teach_tiny_model(out, qa_texts())
    print(out)


def build_lora_adapter(model_dir: Path, path: Path, *, seed: int, r: int = 4) -> Path:
    """Save a LoRA adapter of the model at ``model_dir`` with random, non-zero weights at
    ``path``: deterministic for a given ``seed``, and another seed answers differently."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(path)
    return Path(path)
