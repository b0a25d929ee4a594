"""What the main job runs on without a download: a small Llama-style model built from a config with
seeded weights, a byte-level tokenizer, and a few paragraphs of calibration text.

The model is large enough that every quantizer kind of the shipped recipes is exercised (q/k/v/o
and gate/up/down linears, GQA attention with K/V quantizers, an lm_head and embeddings that the
recipes leave unquantized) and small enough to quantize in seconds on two CPU cores.
"""

from __future__ import annotations

import torch

# Byte-level tokenizer: ids 0-2 are special, byte b is id b + 3 (as ByT5 does).
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
BYTE_VOCAB = 256 + BYTE_OFFSET

BUILTIN_SEED = 0


def builtin_llama_config(attn_implementation: str = "sdpa"):
    """LlamaConfig of the built-in model: 4 layers, hidden 256, 4 query heads and 2 KV heads of
    head_dim 64 (GQA), MLP 768, vocab 320 (the 259 byte ids, padded to a multiple of 64)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=320,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        attn_implementation=attn_implementation,
    )


def build_builtin_model(seed: int = BUILTIN_SEED, dtype: torch.dtype = torch.bfloat16, attn_implementation: str = "sdpa"):
    """LlamaForCausalLM of builtin_llama_config(), weights drawn by transformers' own initializer
    (normal, std 0.02) under torch.manual_seed(seed), then cast to `dtype`; in eval mode. The
    caller's random state is left as it was."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(builtin_llama_config(attn_implementation))
    return model.to(dtype).eval()


def byte_tokenize(text: str) -> torch.Tensor:
    """UTF-8 bytes of `text` as ids (byte + 3) after a BOS id; int64 [n + 1]."""
    return torch.tensor([BOS_ID] + [b + BYTE_OFFSET for b in text.encode("utf-8")], dtype=torch.int64)


def token_batches(ids: torch.Tensor, *, num_batches: int, seq_len: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Split a token stream into `num_batches` calibration batches and one evaluation batch, each
    [1, seq_len]. The evaluation window is the stream's last seq_len tokens; calibration windows
    are consecutive windows of the rest, wrapping around when the text is short."""
    if num_batches < 1 or seq_len < 2:
        raise ValueError(f"need at least 1 calibration batch of 2 or more tokens; got {num_batches} batches of {seq_len}.")
    ids = ids.flatten()
    if ids.numel() < 2 * seq_len:
        raise ValueError(
            f"the calibration text has {ids.numel()} tokens; it needs at least 2 x seq_len = {2 * seq_len} "
            "(one window to calibrate, one to evaluate). Give a longer text or a smaller --seq-len."
        )
    eval_batch = ids[-seq_len:].unsqueeze(0)
    calib = ids[:-seq_len]
    repeats = -(-num_batches * seq_len // calib.numel())
    stream = calib.repeat(repeats)
    batches = [stream[i * seq_len:(i + 1) * seq_len].unsqueeze(0) for i in range(num_batches)]
    return batches, eval_batch


CALIBRATION_TEXT = """\
The lighthouse keeper wrote in his log every evening, even when nothing happened. Wind from the
north-west, force five; two fishing boats returned before dark; the lamp was lit at 18:42 and the
clockwork wound twice. Years later his daughter found the books in a trunk and read them the way
other people read novels, looking for the days when something did happen: a storm that took the
boathouse roof in 1953, a cargo ship that lost its way in fog, the winter the bay froze solid.

Bread is one of the oldest prepared foods. Flour, water, salt and a leavening agent are mixed into
a dough, which is kneaded to develop gluten, left to rise, shaped, and baked. A sourdough starter
is a culture of wild yeasts and lactic acid bacteria; it gives the loaf its sour taste and keeps
it fresh for longer. Bakers adjust hydration, temperature and fermentation time to the flour they
have, and no two batches are ever quite the same.

In numerical computing, a floating-point number stores a sign, an exponent and a mantissa. Fewer
bits mean less memory and faster arithmetic, but also coarser steps between the values that can be
represented. An 8-bit format with four exponent bits and three mantissa bits reaches 448 at most;
a 4-bit format with two exponent bits and one mantissa bit has only the magnitudes 0, 0.5, 1, 1.5,
2, 3, 4 and 6. To use such formats for the weights and activations of a neural network, each block
of values is scaled so that its largest magnitude lands near the top of the range.

The committee met on Tuesday at 9:30 to review the budget for the next fiscal year. Items on the
agenda: (1) maintenance of the river footbridge, estimated at 120,000 euros; (2) new books for the
public library; (3) a proposal to extend the bus line to the northern suburbs. After a long
discussion the first two items were approved unanimously, and the third was sent back for a more
detailed study of passenger numbers.

def moving_average(values, window):
    total, out = 0.0, []
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out

Migratory birds navigate thousands of kilometres using the sun, the stars, the Earth's magnetic
field and landmarks such as coastlines and mountain ranges. Young birds of some species make their
first journey alone and still arrive at the right wintering grounds, which suggests that much of
the route is inherited rather than learned. Ringing studies show that many individuals return to
the same nesting site year after year, sometimes to the same tree.

"Are you sure this is the right road?" she asked, looking at the map upside down. "Quite sure,"
he said, although the sign they had just passed pointed the other way. They drove on for another
twenty minutes, past a farm, a closed petrol station and a field full of sheep, until the road
ended at a gate. Neither of them said anything for a while. Then they both started to laugh.
"""
