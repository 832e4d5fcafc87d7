"""Shared fixtures: models trained once per test session (shared by the pytest-xdist workers)."""
import fcntl
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trained_once(tmp_path_factory, name: str, train) -> str:
    """The workdir `name`, trained by `train(workdir)` once per test session. Under pytest-xdist
    the workers of a session share one base directory: the first worker to get here trains while
    holding a lock, the others wait for it and reuse the workdir (the tests only read it)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # one directory per session, above the workers' own
    workdir, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the worker dies
        if not done.exists():
            train(str(workdir))
            done.touch()
    return str(workdir)


@pytest.fixture
def tiny_config():
    """configs/tiny.py (synthetic reverse task), a fresh ConfigDict for each test."""
    from configs import tiny
    return tiny.get_config()


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
    """A workdir holding a finished configs/tiny.py run (about 25 s on 2 CPU cores)."""
    from configs import tiny
    from s2s_jax import training
    return trained_once(tmp_path_factory, "tiny", lambda workdir: training.train_and_evaluate(tiny.get_config(), workdir))


def _short_pairs(limit: int = 2000, max_words: int = 12) -> list[tuple[str, str]]:
    """The first `limit` pairs of the bundled training corpus with at most `max_words` words a side."""
    from s2s_jax import data
    src = data.read_lines(os.path.join(REPO, "data/bible-es-en/train.es"))
    tgt = data.read_lines(os.path.join(REPO, "data/bible-es-en/train.en"))
    pairs = [(s, t) for s, t in zip(src, tgt) if 0 < len(s.split()) <= max_words and 0 < len(t.split()) <= max_words]
    return pairs[:limit]


@pytest.fixture(scope="session")
def text_workdir(tmp_path_factory):
    """A workdir holding a small es->en model trained on 2,000 short pairs of the bundled corpus
    (1,000 steps, beam dev evaluation; about 80 s on 2 idle CPU cores). Its dev set is every 10th
    of those training pairs: a CI-sized check of the search on a model that learned its data
    (measured: greedy dev BLEU 13.6, beam 5 15.0; BUILD_NOTES.md)."""
    from configs import demo
    from s2s_jax import training

    def train(workdir: str) -> None:
        root = os.path.join(workdir, "data")
        os.makedirs(root, exist_ok=True)
        pairs = _short_pairs()
        for split, rows in (("train", pairs), ("dev", pairs[::10])):
            for side, lang in enumerate(("es", "en")):
                with open(os.path.join(root, f"{split}.{lang}"), "w", encoding="utf-8") as f:
                    f.write("".join(p[side] + "\n" for p in rows))
        config = demo.get_config()
        config.data.train_prefix, config.data.dev_prefix = os.path.join(root, "train"), os.path.join(root, "dev")
        config.data.vocab_size = 1000
        config.data.max_len = 32
        config.data.bucket_boundaries = (12, 20, 33)
        config.model.embed_dim, config.model.encoder_hidden, config.model.decoder_hidden = 64, 64, 128
        config.model.init_scale = 0.0  # Glorot, as configs/tiny.py (small layers)
        config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 1000
        config.log_every_steps = 100
        config.optimizer.learning_rate = 3e-3
        config.optimizer.label_smoothing = 0.0
        config.eval.search = "beam"
        config.eval.batch_size = 64
        training.train_and_evaluate(config, workdir)

    return trained_once(tmp_path_factory, "text", train)
