"""Full CPU-sized es->en run on the bundled Bible corpus (JoeyNMT anchor architecture), sized to
the anchor's 30 minutes on 2 CPU cores.

Command:
  python train.py --config=configs/default.py --workdir=runs/es-en

Expect: bidirectional LSTM 256x2 encoder, LSTM 256 decoder, Luong general attention and input
feeding, the decoder's input embedding tied to the output projection (6,532,416 parameters with
the 8000-piece vocabularies; 8,580,416 untied). 3,100 steps of 64 sentences, Adam at 2e-3 with
the last 20% cooled down linearly to 0 (wsd), label smoothing 0.1. Measured on 2 idle CPU cores
(BUILD_NOTES.md): ~3,700 target tokens/s, 28 minutes with the sentencepiece training and the
compilation, within the JoeyNMT anchor's 30 minutes (`bench/anchor_budget.sh`, which skips the
evaluations before the last): greedy dev BLEU 36.11, beam 5 37.23 (JoeyNMT: 2.80 / 3.44). The
evaluations every eval_every_steps add ~20 s each.

Each field's type, valid range and role on resume are in s2s_jax/configuration.py (KEYS: a new
field needs its row there); configuration.check enforces them before anything is compiled or
written. Override any field on the command line with --config.<group>.<key>=<value>, e.g.
--config.teacher_forcing.k=500.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Seed for parameter init, data order, dropout and scheduled sampling.
    config.seed = 42
    # Total number of optimizer steps (3,100 fit JoeyNMT's 30 minutes on 2 CPU cores).
    config.num_train_steps = 3_100
    # Print a progress line every this many steps.
    config.log_every_steps = 50
    # Dev loss / greedy dev BLEU every this many steps (and at the end).
    config.eval_every_steps = 1000
    # Save a checkpoint every this many steps (and at the end, and on SIGINT/SIGTERM).
    config.checkpoint_every_steps = 500
    # Keep this many most recent checkpoints (the best one by dev BLEU is kept besides them).
    config.keep_checkpoints = 2
    # What to do with a non-finite loss or gradient: "stop" the run, or "skip" the update.
    config.on_nonfinite = "stop"
    # Warm start: another workdir whose parameters start this run (its tokenizers are reused; the
    # optimizer and the step start fresh); "" = off.
    config.init_from = ""
    # Which checkpoint step of init_from to start from (0 = its best, or its latest when none was evaluated).
    config.init_from_step = 0

    config.data = data = ml_collections.ConfigDict()
    # "files" reads {prefix}.{lang}; "copy" | "reverse" | "sort" are synthetic tasks.
    data.task = "files"
    # Training files prefix (relative paths resolve against the current directory).
    data.train_prefix = "data/bible-es-en/train"
    # Dev files prefix.
    data.dev_prefix = "data/bible-es-en/dev"
    # Source language suffix.
    data.src_lang = "es"
    # Target language suffix.
    data.tgt_lang = "en"
    # Sentencepiece vocabulary size, per side (>= 6: 4 special ids, the word boundary, a character).
    data.vocab_size = 8000
    # Sentencepiece model type: "unigram" or "bpe".
    data.spm_model_type = "unigram"
    # Sentencepiece trains on a uniform random sample of at most this many training pairs.
    data.spm_sample_size = 1_000_000
    # Training pairs with more pieces than this on either side are dropped (dev never is).
    data.max_len = 64
    # Padded lengths of the batch buckets (one jit shape each); the last must be >= max_len + 1.
    data.bucket_boundaries = (16, 24, 32, 48, 65)
    # Sentences per batch (when max_tokens is 0).
    data.batch_size = 64
    # Batches by tokens (0 = off): each bucket's batches hold max_tokens // boundary rows, rounded
    # down to a multiple of the device count (one compiled shape per bucket; batch_size unused).
    data.max_tokens = 0
    # One sentencepiece model trained on both sides (vocab_size pieces in all), used for both.
    data.joint_vocab = False
    # Empty lines in the training/dev files: "skip" (counted and logged) or "error".
    data.on_empty = "skip"
    # Use only the first N training pairs (0 = all).
    data.max_train_pairs = 0
    # Use only the first N dev pairs (0 = all).
    data.max_dev_pairs = 0
    # Synthetic tasks only: token vocabulary (ids 4..V-1 are symbols).
    data.synthetic_vocab_size = 20
    # Synthetic tasks only: shortest sequence.
    data.synthetic_min_len = 2
    # Synthetic tasks only: longest sequence.
    data.synthetic_max_len = 10
    # Synthetic tasks only: training examples.
    data.synthetic_train_size = 5000
    # Synthetic tasks only: dev examples.
    data.synthetic_dev_size = 200
    # Synthetic tasks only: data seed (dev uses seed + 1).
    data.synthetic_seed = 0

    config.model = model = ml_collections.ConfigDict()
    # Embedding size (source and target embeddings are separate unless share_embeddings).
    model.embed_dim = 256
    # Encoder LSTM size per direction.
    model.encoder_hidden = 256
    # Encoder LSTM layers.
    model.encoder_layers = 1
    # Read the source in both directions.
    model.bidirectional = True
    # Feed the source reversed (Sutskever et al. 2014); attention still aligns to source order.
    model.reverse_source = False
    # Decoder LSTM size.
    model.decoder_hidden = 256
    # Decoder LSTM layers.
    model.decoder_layers = 1
    # Attention score: none | dot | general | concat | scaled_dot.
    model.attention = "general"
    # Hidden size of the concat (Bahdanau) score's MLP.
    model.attention_dim = 256
    # Feed the previous attentional vector into the decoder input (Luong).
    model.input_feeding = True
    # Dropout on embeddings, between encoder layers and before the output projection.
    model.dropout = 0.2
    # Weights and embeddings ~ U(-init_scale, init_scale) (Luong et al. 2015); 0 = Glorot uniform with
    # orthogonal recurrent weights. 0.1 leaves the early unigram plateau far sooner (BUILD_NOTES.md).
    model.init_scale = 0.1
    # Matmul compute dtype: float32, or bfloat16 on accelerators (parameters stay float32).
    model.dtype = "float32"
    # Tokens per chunk of the fused output projection + loss in training and dev loss (0 = plain logits).
    model.output_chunk = 512
    # The decoder's input embedding is the output projection's matrix, transposed (Press & Wolf
    # 2017); needs embed_dim == decoder_hidden.
    model.tie_embeddings = True
    # One embedding table for the encoder and the decoder; needs data.joint_vocab (one vocabulary).
    model.share_embeddings = False

    config.optimizer = opt = ml_collections.ConfigDict()
    # Peak learning rate of Adam.
    opt.learning_rate = 2e-3
    # Linear warmup steps from 0 to the peak.
    opt.warmup_steps = 200
    # After warmup: "constant", "cosine" (to 10% of peak at the last step), "rsqrt", or "wsd"
    # (constant, then linear to 0 over the last 20% of num_train_steps).
    opt.decay = "wsd"
    # Adam beta1.
    opt.b1 = 0.9
    # Adam beta2.
    opt.b2 = 0.999
    # Clip gradients to this global norm (0 = off).
    opt.clip_norm = 1.0
    # Plateau decay: multiply the learning rate by this factor after plateau_patience evaluations
    # without improvement of early_stopping.metric (optax.contrib.reduce_on_plateau; 0 = off).
    opt.plateau_factor = 0.0
    # Evaluations without improvement before each plateau decay.
    opt.plateau_patience = 2
    # Label smoothing of the cross-entropy (0 = off).
    opt.label_smoothing = 0.1
    # Decode (dev BLEU, best checkpoint, translate, export) with an exponential moving average of the
    # parameters kept in the train state, this decay per step (0 = off; e.g. 0.999).
    opt.ema_decay = 0.0
    # Gradient accumulation: split each batch into this many micro-batches (one update; data.batch_size
    # must divide by it times the device count). Same update, less activation memory.
    opt.accumulate_steps = 1

    config.teacher_forcing = tf = ml_collections.ConfigDict()
    # Schedule of the ground-truth feeding ratio: constant | linear | exponential | inverse_sigmoid.
    tf.schedule = "constant"
    # Ratio at step 0 (1.0 = always ground truth).
    tf.start = 1.0
    # Ratio the schedule decays towards.
    tf.end = 0.0
    # Linear schedule: steps from start to end.
    tf.decay_steps = 10_000
    # Exponential: base 0 < k < 1; inverse_sigmoid: k >= 1 (larger = slower decay); 0 = auto: the
    # ratio passes halfway from start to end at num_train_steps / 2 (s2s_jax/schedules.py).
    tf.k = 0.0
    # Scheduled sampling: "sequential" (step by step, exact) or "parallel" (Duckworth et al. 2019:
    # teacher-forced prediction passes, then the loss on their mixed inputs on the fast path).
    tf.mode = "sequential"
    # Parallel mode: prediction passes, each fed the previous one's mixed inputs (>= 1).
    tf.passes = 1

    config.eval = ev = ml_collections.ConfigDict()
    # Sentences per dev-loss batch.
    ev.batch_size = 128
    # Rows of every decoding call (dev BLEU, translate, evaluate, serve, export): a sentence's
    # translation depends on the call's shape, never on the other sentences in it.
    ev.decode_rows = 32
    # Source buckets of decoding calls, () = data.bucket_boundaries. Fewer, wider buckets let a
    # server decode concurrent requests in fewer calls (s2s_jax.serve --decode_buckets).
    ev.decode_buckets = ()
    # Matmul dtype of decoding calls, "" = model.dtype. "bfloat16" (float32 sums) decodes a float32
    # model faster on CPUs with AVX512-BF16 or AMX (1.25x greedy, 1.44x beam on this project's
    # machines) and on accelerators; scores move in the third digit.
    ev.decode_dtype = ""
    # Compiled output limit, in pieces: min(max_decode_len, 2 * source bucket length + 10).
    ev.max_decode_len = 128
    # Per-sentence output limit max_len_a * source pieces + max_len_b (fairseq's rule), within that.
    ev.max_len_a = 2.0
    # See max_len_a.
    ev.max_len_b = 10
    # Decoding for dev BLEU: "greedy" or "beam" (beam also reports greedy).
    ev.search = "greedy"
    # Beam size when search = "beam".
    ev.beam_size = 5
    # GNMT length penalty exponent for beam search (0 = raw log-probability).
    ev.alpha = 0.6
    # What ranks the kept best checkpoint: dev_bleu (greedy), dev_bleu_beam (needs search = "beam"),
    # dev_chrf (greedy) or dev_loss (lower is better).
    ev.best_metric = "dev_bleu"
    # More sets scored at every evaluation, "name=prefix,name=prefix" (files prefix.src_lang and
    # prefix.tgt_lang; metrics name_loss, name_bleu, name_chrf); "" = none.
    ev.extra_sets = ""

    config.early_stopping = stop = ml_collections.ConfigDict()
    # Stop when this dev metric stops improving: "off", "dev_bleu" (greedy) or "dev_loss"; it also
    # drives optimizer.plateau_factor.
    stop.metric = "off"
    # Evaluations without an improvement of more than min_delta before the run stops.
    stop.patience = 5
    # The smallest change that counts as an improvement (BLEU points, or nats of dev loss).
    stop.min_delta = 0.0

    # Several processes (one per host): how the run is laid out, never its maths (free on resume).
    config.distributed = dist = ml_collections.ConfigDict()
    # "" = one process; "HOST:PORT" of process 0's coordinator; "auto" = detected (TPU pod, SLURM, Open MPI).
    dist.coordinator_address = ""
    # Processes in the run (ignored when "auto").
    dist.num_processes = 1
    # This process's number, 0 .. num_processes - 1 (ignored when "auto"); process 0 writes the files.
    dist.process_id = 0
    # A process silent for this long counts as dead: the others stop with an error (JAX's heartbeat).
    # Above gloo's 30 s wait in a collective, so a peer lost there is reported as such (status 3).
    dist.heartbeat_timeout_s = 60
    # How long a process waits for all the others to join (and agree on the config) before it gives up.
    dist.init_timeout_s = 45
    return config
