"""Tiny random Llama-architecture models (Llama, Qwen2, Mistral) for tests; nothing is
downloaded. Needs transformers and tokenizers.

`save_tiny_llama` writes a transformers directory (config.json + model.safetensors) and, by
default, a real byte-level BPE tokenizer trained here on a few hundred words. The FFN
neurons of every layer get very different importances, in a random order, so that
reordering them (`mnm matformerize`) visibly matters.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

VOCAB = 300
HIDDEN = 32
MAX_POSITIONS = 128
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # head_dim 16, theta 1e4: wavelengths 6.3 (kept), 19.9 (blended), 63.. (slowed)
    "original_max_position_embeddings": 32,
}
_NOUNS = "cat dog bird fish tree river stone house road city model layer neuron token"
_VERBS = "sat ran flew swam grew fell stood saw made took"
_ADJS = "big small red blue green old new quick slow happy"
_PREPS = "on over under near into from with of to in"
_DETS = "the a one every this that"
_JOINS = "and but so then"


def english(n_sentences: int, seed: int) -> str:
    """Sentences of a tiny grammar (determiner adjective noun verb preposition ...): text
    with structure a small model learns in a few steps; different seeds, different text."""
    rng = random.Random(seed)
    dets, adjs, nouns, verbs = (w.split() for w in (_DETS, _ADJS, _NOUNS, _VERBS))
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(dets), rng.choice(adjs), rng.choice(nouns), rng.choice(verbs)]
        words += [rng.choice(_PREPS.split()), rng.choice(dets), rng.choice(nouns)]
        if rng.random() < 0.5:
            words += [rng.choice(_JOINS.split()), rng.choice(dets)]
            words += [rng.choice(nouns), rng.choice(verbs)]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def save_tokenizer(path: Path, vocab_size: int = VOCAB) -> None:
    """A byte-level BPE (any text encodes) trained on the tiny grammar, `vocab_size` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    words = " ".join([_DETS, _ADJS, _NOUNS, _VERBS, _PREPS, _JOINS])
    tokenizer.train_from_iterator([english(40, seed=100), words], trainer)
    assert tokenizer.get_vocab_size() <= vocab_size
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(str(path))


def tiny_config(
    model_type: str = "llama",
    *,
    tie: bool = True,
    intermediate_size: int = 64,
    n_layers: int = 3,
    **overrides: Any,
) -> Any:
    import transformers

    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
    )
    if model_type == "llama":
        cls = transformers.LlamaConfig
    elif model_type == "qwen2":
        cls = transformers.Qwen2Config
        kwargs.update(num_attention_heads=4, num_key_value_heads=2)  # 4 query heads of 8
    elif model_type == "mistral":
        cls = transformers.MistralConfig
        kwargs.update(sliding_window=None, num_attention_heads=4, num_key_value_heads=2)
    else:
        raise ValueError(model_type)
    kwargs.update(overrides)
    return cls(**kwargs)


def random_model(config: Any, *, seed: int = 0) -> Any:
    """Every parameter random, norms and biases too (the default init leaves norms at 1)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1.0 + 0.2 * torch.randn(parameter.shape, generator=generator))
            elif name.endswith("bias"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.copy_(0.15 * torch.randn(parameter.shape, generator=generator))
    return model


def importances(model: Any, seed: int) -> list[torch.Tensor]:
    """Per layer, one factor per FFN neuron: 10 ** u, u evenly spread over [-2.5, 0] in a
    random order (a few neurons carry most of the FFN; the stored order is arbitrary)."""
    generator = torch.Generator().manual_seed(seed + 7)
    factors = []
    for layer in model.model.layers:
        width = layer.mlp.down_proj.weight.shape[1]
        exponents = torch.linspace(0.0, -2.5, width)[torch.randperm(width, generator=generator)]
        factors.append(10.0**exponents)
    return factors


def train(
    model: Any,
    factors: list[torch.Tensor],
    text: str,
    tokenizer_dir: Path,
    *,
    steps: int,
    seed: int = 0,
) -> None:
    """A few Adam steps of next-token prediction on `text`, every FFN neuron's output scaled
    by its fixed factor throughout (so the importances survive training): a model better
    than chance whose important neurons visibly cost loss when dropped."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    seq = 64
    windows = ids[: len(ids) // seq * seq].view(-1, seq)
    generator = torch.Generator().manual_seed(seed)
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda _, args, f=f: (args[0] * f,))
        for layer, f in zip(model.model.layers, factors)
    ]
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        batch = windows[torch.randint(len(windows), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    for hook in hooks:
        hook.remove()


def save_tiny_llama(
    path: Path,
    *,
    model_type: str = "llama",
    tie: bool = True,
    seed: int = 0,
    intermediate_size: int = 64,
    n_layers: int = 3,
    tokenizer: bool = True,
    train_steps: int = 0,
    **overrides: Any,
) -> Path:
    """A tiny random (or briefly trained) checkpoint directory as transformers writes it;
    `overrides` go to the config (e.g. `rope_scaling=LLAMA3_ROPE`)."""
    path = Path(path)
    config = tiny_config(
        model_type, tie=tie, intermediate_size=intermediate_size, n_layers=n_layers, **overrides
    )
    model = random_model(config, seed=seed)
    factors = importances(model, seed)
    if tokenizer or train_steps:
        save_tokenizer(path)
    if train_steps:
        train(model, factors, english(400, seed=seed + 1), path, steps=train_steps, seed=seed)
    with torch.no_grad():  # fold the importances into the weights
        for layer, factor in zip(model.model.layers, factors):
            layer.mlp.down_proj.weight.mul_(factor)
    model.save_pretrained(str(path))
    if not tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (path / name).unlink(missing_ok=True)
    return path


def hf_model(path: Path) -> Any:
    """The checkpoint as transformers loads it (float32, eager attention, eval mode)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def input_ids(batch: int = 2, length: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
