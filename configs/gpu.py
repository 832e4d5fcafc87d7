"""One accelerator (GPU / TPU): a bigger model with bfloat16 matmuls on the bundled es->en corpus.

Command:
  python train.py --config=configs/gpu.py --workdir=runs/es-en-gpu

Model: embeddings 512, 2-layer bidirectional LSTM encoder 512 per direction, LSTM decoder 1024,
Luong general attention, input feeding; 42,620,736 parameters with the 8000-piece vocabularies of
the bundled corpus (set --config.data.vocab_size=32000 for a WMT-sized corpus). Matmuls run in
bfloat16; parameters, optimizer state, softmax and losses stay float32 (tests/test_training.py
checks bfloat16 training against float32 on CPU). Not yet measured on an accelerator
(BUILD_NOTES.md).
"""
from configs import default


def get_config():
    config = default.get_config()
    # Long enough for the bigger model to converge on the bundled corpus.
    config.num_train_steps = 30_000
    # Dev loss / BLEU every this many steps.
    config.eval_every_steps = 2000
    # Checkpoint every this many steps.
    config.checkpoint_every_steps = 1000
    # Larger batches: an accelerator is busy only with many rows per matmul.
    config.data.batch_size = 128
    # Embedding size.
    config.model.embed_dim = 512
    # Encoder LSTM size per direction (memory 1024 = decoder size).
    config.model.encoder_hidden = 512
    # Two encoder layers.
    config.model.encoder_layers = 2
    # Decoder LSTM size.
    config.model.decoder_hidden = 1024
    # Concat-attention MLP size (unused by general attention).
    config.model.attention_dim = 512
    # Dropout of Luong et al. 2015 for models of this size.
    config.model.dropout = 0.3
    # bfloat16 matmuls (parameters stay float32).
    config.model.dtype = "bfloat16"
    # Embeddings 512, decoder 1024: the decoder's input embedding stays its own table.
    config.model.tie_embeddings = False
    # Adam at 1e-3, constant after warmup, no label smoothing (not yet tuned on an accelerator).
    config.optimizer.learning_rate = 1e-3
    config.optimizer.decay = "constant"
    config.optimizer.label_smoothing = 0.0
    # Longer warmup for the larger batch.
    config.optimizer.warmup_steps = 1000
    # Evaluate with beam search too (greedy is always reported).
    config.eval.search = "beam"
    return config
