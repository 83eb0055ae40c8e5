# Hand-written (not exported from a notebook): the package's front door.
"""llmcourse: a GPT-style language model built from scratch, one notebook a day.

Each module is exported from one day notebook (its first lines name it); import what you need::

    from llmcourse.core import get_device, set_seed          # Day 1
    from llmcourse.gradcheck import gradcheck                 # Day 2
    from llmcourse.linear import Linear, count_parameters     # Day 3
    from llmcourse.functional import softmax, gelu            # Day 4
    from llmcourse.loss import cross_entropy, perplexity      # Day 5
    from llmcourse.optim import AdamW, configure_optimizer    # Day 6
    from llmcourse.data import load_corpus                    # Day 7
    from llmcourse.chartok import CharTokenizer               # Day 7
    from llmcourse.bpe import BPETokenizer                    # Day 8
    from llmcourse.batches import get_batch                   # Day 9
    from llmcourse.embeddings import TokenAndPositionEmbedding  # Day 10
    from llmcourse.bigram import BigramLanguageModel          # Day 11
    from llmcourse.rnn import LSTMCell                        # Day 12
    from llmcourse.attention import scaled_dot_product_attention  # Day 13
    from llmcourse.mha import CausalSelfAttention             # Day 14
    from llmcourse.norms import LayerNorm, RMSNorm            # Day 15
    from llmcourse.mlp import MLP, SwiGLU                     # Day 16
    from llmcourse.block import Block                         # Day 17
    from llmcourse.gpt import GPT, GPTConfig                  # Day 18
    from llmcourse.schedule import cosine_lr, LRScheduler     # Day 19
    from llmcourse.train import TrainConfig, Trainer          # Day 20
    from llmcourse.checkpoint import load_pretrained          # Day 21
    from llmcourse.diagnostics import EarlyStopping           # Day 22
    from llmcourse.presets import preset_config, start_run    # Day 23
    from llmcourse.experiments import sweep, race             # Day 24
    from llmcourse.generate import generate                   # Day 25
    from llmcourse.sampling import top_k_filter, top_p_filter # Day 26
    from llmcourse.widgets import sampling_widget             # Day 27
    from llmcourse.kvcache import KVCache                     # Day 28
    from llmcourse.decoding import beam_search, StopStrings   # Day 29
    from llmcourse.commands import run_generate               # Day 30
    from llmcourse.perf import training_memory, flops_per_token  # Day 31
    from llmcourse.amp import choose_amp_dtype, autocast_context  # Day 32
    from llmcourse.kernels import compile_model, plain_state_dict  # Day 33
    from llmcourse.memory import accumulation_step, enable_activation_checkpointing  # Day 34

`python -m llmcourse.export` regenerates those modules from notebooks/; `llmcourse train` trains a model (Day 23) and `llmcourse generate` writes with one (Day 30).
"""

__version__ = "0.1.0"
