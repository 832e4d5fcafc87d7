"""Score a trained workdir (or an ensemble) on a held-out parallel set: BLEU and chrF of its
translations (sacrebleu, with its signature) and the teacher-forced loss, per search.

    python -m s2s_jax.evaluate --workdir=runs/demo --prefix=data/bible-es-en/test
    python -m s2s_jax.evaluate --workdir=runs/demo --prefix=data/bible-es-en/test --search=beam --beam_size=10

Reads PREFIX.<data.src_lang> and PREFIX.<data.tgt_lang> (pairs with an empty side skipped), decodes
with the best checkpoint through the same driver and options as translate (every search flag of
translate; without --search: greedy and beam), and prints one JSON line. With one workdir it also
appends that line to the workdir's metrics.jsonl (at the checkpoint's step) and records it in
summary.json under evaluations[NAME]: keys NAME_loss, NAME_ppl, NAME_bleu, NAME_chrf (greedy),
NAME_bleu_beam, NAME_chrf_beam (beam), NAME_bleu_signature. It takes the workdir's lock, so it is
refused while a run trains there. Errors are one line, status 1.
"""
from __future__ import annotations

import json
import math
import os
import sys

from s2s_jax import checkpoints, cli, data, files, metrics, workdir_lock
from s2s_jax.translate import OPTION_FLAGS, Translator

FLAGS_USED = [name for name in OPTION_FLAGS if name != "n_best"]  # the best hypothesis is scored


def _define_flags() -> None:
    from absl import flags
    cli.define_workdir_flag("evaluate")
    cli.define_compilation_cache_flag()
    flags.DEFINE_string("prefix", None, "The set's files: PREFIX.<src_lang> and PREFIX.<tgt_lang>.", required=True)
    flags.DEFINE_string("name", None, "The set's name in metrics.jsonl and summary.json; default: the "
                        "prefix's file name (e.g. test).")
    cli.define_option_flags(FLAGS_USED)
    cli.define_decoding_flags()


def evaluate(translator: Translator, prefix: str, name: str, options: dict) -> dict:
    """The set's metrics: NAME_loss, NAME_ppl, then BLEU and chrF per search (greedy: NAME_bleu,
    beam: NAME_bleu_beam, sample: NAME_bleu_sample), the sacrebleu signature and what was run."""
    cfg = translator.config.data
    src, tgt, skipped = data.read_parallel(f"{prefix}.{cfg.src_lang}", f"{prefix}.{cfg.tgt_lang}")
    scores = translator.score(src, tgt)
    loss = -sum(s.log_prob for s in scores) / sum(s.pieces for s in scores)
    result = {"step": translator.steps[0], f"{name}_loss": loss, f"{name}_ppl": math.exp(loss)}
    searches = [options["search"]] if "search" in options else ["greedy", "beam"]
    for search in searches:
        hyps = translator.translate(src, **dict(options, search=search))
        bleu, signature = metrics.sacrebleu_score(hyps, tgt)
        suffix = "" if search == "greedy" else f"_{search}"
        result[f"{name}_bleu{suffix}"] = bleu
        result[f"{name}_chrf{suffix}"] = metrics.chrf_score(hyps, tgt)
        result[f"{name}_bleu_signature"] = signature
    result["evaluate"] = dict(prefix=prefix, sentences=len(src), skipped_empty=skipped, options=options,
                              workdirs=translator.workdir, checkpoint_steps=list(translator.steps))
    return result


def record(workdir: str, name: str, result: dict) -> None:
    """Appends `result` to metrics.jsonl and sets summary.json's evaluations[name] (holding the lock)."""
    with workdir_lock.hold(workdir):
        with open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
        path = os.path.join(workdir, "summary.json")
        summary = files.read_json(path) if os.path.exists(path) else {}
        summary.setdefault("evaluations", {})[name] = result
        files.write_json(path, summary)


def main(argv) -> None:
    f = cli.parsed_flags("evaluate", argv)
    name = f.name or os.path.basename(f.prefix.rstrip("/")) or "test"
    workdirs = f.workdir.split(",")
    try:
        if name == "dev":
            raise ValueError("the set's name would be 'dev', the training dev set's (dev_bleu, dev_loss, ...): "
                             "name this one with --name, e.g. --name=dev2")
        if not name.isidentifier():
            raise ValueError(f"--name={name!r} must be letters, digits and _; give --name")
        if len(workdirs) == 1:
            with workdir_lock.hold(workdirs[0]):  # refused at once while a run trains there
                pass
        translator = Translator.from_workdirs(workdirs, cli.decoding_values(f))
        options = cli.option_values(f, FLAGS_USED)
        translator.options(**options)  # bad options fail before any decoding
        result = evaluate(translator, f.prefix, name, options)
        if len(workdirs) == 1:
            record(workdirs[0], name, result)
    except (ValueError, checkpoints.CheckpointError, workdir_lock.WorkdirError) as error:
        raise SystemExit(f"evaluate: {error}") from None
    except OSError as error:
        raise SystemExit(f"evaluate: {error.filename or f.workdir}: {error.strerror or error}") from None
    sys.stdout.write(json.dumps(result) + "\n")


def run() -> None:
    from absl import app
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
