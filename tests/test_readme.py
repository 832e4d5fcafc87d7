"""The README's "Beam search from your own code" and "Metrics" examples run as written.

Each ```python block of those sections is executed in a fresh namespace. The trained-model example
reads `WORKDIR = "runs/demo"` and a Spanish sentence; here they become the session's tiny workdir
(synthetic reverse task) and a sentence of its id vocabulary.
"""
import ast
import os
import re

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Beam search from your own code"


def section_blocks(language: str, section: str = SECTION) -> list[str]:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index(section + "\n")
    end = text.find("\n## ", start + len(section))
    body = text[start:end if end >= 0 else len(text)]
    return re.findall(rf"^```{language}\n(.*?)^```$", body, flags=re.DOTALL | re.MULTILINE)


def substitute(code: str, name: str, value: str) -> str:
    code, count = re.subn(rf"^{name} = .*$", f"{name} = {value}", code, flags=re.MULTILINE)
    assert count == 1, f"the example must set {name} on one line"
    return code


def test_section_has_two_python_examples_and_the_cli_line():
    assert len(section_blocks("python")) == 2
    assert any("python -m s2s_jax.translate --workdir=" in block for block in section_blocks("bash"))


def test_toy_step_fn_example(capsys):
    namespace = {"__name__": "readme_example_a"}
    exec(compile(section_blocks("python")[0], "README.md: example A", "exec"), namespace)
    beams = namespace["beams"]
    assert beams.sequences.shape == (2, 2, 8)
    assert beams.scores.shape == beams.lengths.shape == (2, 2)
    scores = np.asarray(beams.scores)
    assert np.all(np.isfinite(scores)) and np.all(scores[:, 0] >= scores[:, 1])
    assert np.all(np.asarray(beams.sequences) != 1)  # no BOS is ever emitted
    assert "(2, 2, 8)" in capsys.readouterr().out


def test_trained_model_example(tiny_workdir, capsys):
    code = section_blocks("python")[1]
    code = substitute(code, "WORKDIR", repr(tiny_workdir))
    code = substitute(code, "SENTENCES", repr(["4 5 6 7"]))
    namespace = {"__name__": "readme_example_b"}
    exec(compile(code, "README.md: example B", "exec"), namespace)
    beams = namespace["beams"]
    assert beams.sequences.shape == (1, 3, 40)
    assert beams.scores.shape == (1, 3)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(["7 6 5 4"])  # translator.translate(...)
    best_three = ast.literal_eval(lines[1])  # the printed list of the 3 best
    assert len(best_three) == 3 and best_three[0] == "7 6 5 4"


def test_metrics_example_prints_what_its_comments_say(capsys):
    """Each print line's trailing comment is its output ("..." at the end: a prefix of it)."""
    [code] = section_blocks("python", "## Metrics")
    exec(compile(code, "README.md: metrics example", "exec"), {"__name__": "readme_metrics"})
    expected = [line.split("# ", 1)[1] for line in code.splitlines() if line.startswith("print(")]
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(expected) == 3
    for out, comment in zip(printed, expected):
        assert out.startswith(comment.removesuffix("...")) if comment.endswith("...") else out == comment
