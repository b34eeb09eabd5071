"""A small random-weight Llama that vLLM loads from a folder: no weights can be
downloaded here, and the tests, the demo and the benchmark need a real checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ("the pool keeps blocks of keys and values so that a second engine can reuse the "
         "prefix of a prompt instead of computing it again while decode engines stream tokens")


def build(folder: Path, *, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
          intermediate: int = 256, vocab: int = 512, max_positions: int = 4096,
          dtype: str = "float32", seed: int = 0) -> Path:
    """Write config, random weights (seeded) and a BPE tokenizer into ``folder``. The CPU
    attention backend needs a head size of at least 32."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=intermediate,
                      vocab_size=vocab, max_position_embeddings=max_positions,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                      torch_dtype=dtype)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([WORDS] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(folder)
    cfg_path = folder / "config.json"
    conf = json.loads(cfg_path.read_text())
    conf["torch_dtype"] = dtype
    cfg_path.write_text(json.dumps(conf, indent=1))
    return folder


if __name__ == "__main__":
    import sys

    print(build(Path(sys.argv[1])))
