"""Makes a tiny Llama model and tokenizer locally (random weights, BPE trained in-process) for tests and demos.

There is no model hub here; the tests, the embedded demo and the benchmarks all serve this model on CPU vLLM.
The output is deterministic for a given seed, and written atomically: a directory is either complete or absent.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is two plus three? The answer is 5.",
    "Compute 7 times 6 and give the final answer as a number: 42.",
    "Reinforcement learning from verifiable rewards checks the answer.",
    "user: hello there\nassistant: hi, how can I help?",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ( )",
)
# Like real instruct templates, an assistant turn is rendered as sampled: the generation prompt, the reply (a tool
# call as its JSON arguments), then EOS, so a later turn's prompt extends the earlier prompt and response.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}assistant:{{ m['content'] or '' }}"
    "{% for c in m['tool_calls'] or [] %}{% set a = c['function']['arguments'] %}"
    "{{ a if a is string else a | tojson }}{% endfor %}</s>\n"
    "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
FORMAT_VERSION = "2"


def make_tiny_model(directory: Path, seed: int = 0, vocab_size: int = 512) -> Path:
    """Write a tiny Llama (2 layers, hidden 64, head_dim 32) and its tokenizer to ``directory``."""
    return make_llama(directory, seed=seed, vocab_size=vocab_size)


def make_llama(
    directory: Path,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    head_dim: int = 32,
) -> Path:
    """Write a Llama of the given shape (random weights, fp32) and the in-process tokenizer to ``directory``."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        bpe.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(staging)

        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            dtype="float32",
        )
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(staging, safe_serialization=True)
        os.replace(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return directory


def default_model_dir() -> Path:
    """Where the shared tiny model is cached (``EXPLORER_TINY_MODEL_DIR`` overrides)."""
    override = os.environ.get("EXPLORER_TINY_MODEL_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1] / ".cache" / f"tiny-llama-v{FORMAT_VERSION}"
