"""The README's commands run as written (after the quick start, in its environment): every command of its code
blocks and inline `python ...` spans is run offline at its smallest size (size overrides appended), or, where it
needs GPUs, hub models or a judge, has its names and keys checked; the rest are listed here with the reason."""

import contextlib
import io
import re
import shlex
from typing import NamedTuple

import pytest

import eval as eval_script
from feedbackalign import configuration
from helpers import REPO, run_script

README = (REPO / "README.md").read_text(encoding="utf-8")
# what each kind of command gets appended to run at its smallest size
SMALL_TRAIN = ["n_examples=16", "model.batch_size=8", "n_eval_examples=8", "model.eval_batch_size=8",
               "++dataset_options.wordsort.n_prompts=48"]
SMALL_EVAL = ["++n_samples=8", "++max_new_tokens=8", "++model.eval_batch_size=8"]
NOT_RUN = {  # command -> why this test does not run it
    "python ...": "a placeholder in the prose",
    "make demo": "tests/test_demo.py runs the demo; tests/test_packaging.py checks the Makefile",
    "make test": "this suite",
    "source .venv/bin/activate": "the tests run in that environment already",
    "python train.py": "run in full by tests/test_trainers.py::test_python_train_py_with_no_arguments",
    "python -m showcase.benchmark": "a benchmark of minutes (docs/performance.md)",
    "python -m feedbackalign.data_summary": "the module's name in the layout; its full command is run",
    "python tools/gpu_check_precision.py": "needs a GPU; tests/test_precision.py runs it with --cpu",
}


def commands() -> list[str]:
    """Every command of the README's bash blocks (continuation lines joined, comments dropped) and every inline
    code span that starts with `python ` or `torchrun `, in order."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                found.append(" ".join(words))
    spans = (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", README.replace("```", "\0")))
    found += [span for span in spans if span.startswith(("python ", "torchrun "))]
    return found


def train_overrides(words: list[str]) -> list[str]:
    return words[words.index("train.py") + 1:]


def is_offline(words: list[str]) -> bool:
    """A train.py command on the embedded model (model= absent or tiny) runs here."""
    return not any(w.startswith("model=") and w != "model=tiny" for w in words) and words[0] == "python"


class Ran(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def in_process(main, argv: list[str], folder) -> Ran:
    """An entry point's main(argv) run here, in `folder` (the same code path as its command line)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.chdir(folder)
        code = main(argv)
    return Ran(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def first_steps(tmp_path_factory, shared_data):
    """The README run in order in a fresh folder: train.py as a subprocess (Hydra's entry point), the other entry
    points through their main(argv) in this process; returns (folder, {command: result})."""
    from feedbackalign import data_summary, task

    folder = tmp_path_factory.mktemp("readme")
    modules = {"feedbackalign.task": task.main, "feedbackalign.data_summary": data_summary.main}
    results = {}
    for command in commands():
        words = command.split()
        if command in NOT_RUN or words[0] == "make":
            continue
        if "train.py" in words and is_offline(words):
            small = [] if "--cfg" in words else SMALL_TRAIN
            results[command] = run_script(str(REPO / "train.py"), *train_overrides(words), *small, cwd=folder)
        elif words[:2] == ["python", "eval.py"] and (folder / words[2].split("=", 1)[1]).is_dir():
            results[command] = in_process(eval_script.main, [*words[2:], *SMALL_EVAL], folder)
        elif words[:2] == ["python", "-m"] and words[2] in modules:
            argv = [a.replace("../shared/data", str(shared_data)) for a in words[3:]]
            results[command] = in_process(modules[words[2]], argv, folder)
    return folder, results


CACHE_DISK_COST = "tools/ref_cache_disk_cost.py"


def test_the_cache_disk_cost_command_runs_on_real_data(shared_data):
    """The README's cache disk figures come from this command; here on 16 HH pairs (the README's run: 1024)."""
    assert f"`python {CACHE_DISK_COST}`" in README
    result = run_script(CACHE_DISK_COST, "--pairs", "16", "--data_dir", str(shared_data))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("max_length=")]
    assert [line.split(":")[0] for line in lines] == ["max_length=128", "max_length=768"]
    assert all(re.search(r"32 sequences, \d+ response tokens each, [\d.]+ B/token", line) for line in lines)


def test_every_command_is_run_checked_or_excused():
    for command in commands():
        words = command.split()
        runnable = command in NOT_RUN or words[0] == "make" or "train.py" in words or "loop.py" in words or \
            words[:2] == ["python", "eval.py"] or words[:2] == ["python", "-m"] or "compare.py" in words or \
            "label.py" in words or words[:2] == ["python", CACHE_DISK_COST]
        assert runnable, f"the README's `{command}` is neither run nor checked here: add it to tests/test_readme.py"


def test_the_offline_commands_run_as_written(first_steps):
    folder, results = first_steps
    assert len(results) >= 7, list(results)
    for command, result in results.items():
        assert result.returncode == 0, f"`{command}` failed:\n{result.stderr[-2000:]}"
    sft = results["python train.py loss=sft exp_name=sft n_epochs=2"].stdout
    assert "run sft (loss=sft, model=tiny, seed 0): 2 steps, 16 examples" in sft
    assert "metrics    runs/sft/metrics.jsonl" in sft and "HF export  runs/sft/LATEST/hf" in sft
    assert "model.load_from=runs/sft/LATEST/policy.pt" in sft
    dpo = next(r for c, r in results.items() if "loss=dpo exp_name=dpo" in c)
    assert "warning" not in dpo.stderr, dpo.stderr   # model.load_from given: nothing to warn about
    assert (folder / "runs" / "dpo" / "summary.json").is_file()
    scored = results["python -m feedbackalign.task score samples/sft.json samples/dpo.json"].stdout.splitlines()
    assert [line.split(":")[0] for line in scored] == ["samples/sft.json", "samples/dpo.json"]
    assert all("8 samples, true reward" in line for line in scored)
    assert "beta: 0.5" in results["python train.py loss=dpo --cfg job"].stdout   # "prints every key"
    summary = next(r for c, r in results.items() if c.startswith("python -m feedbackalign.data_summary"))
    assert "hh" in summary.stdout and "oasst" in summary.stdout


def test_gpu_commands_have_valid_names_and_keys(first_steps):
    """The GPU section's commands need hub models and GPUs; their loss/model names and keys must exist, and the
    eval.py keys must be valid for a run's saved config."""
    folder, _ = first_steps
    checked = 0
    for command in commands():
        words = command.split()
        if "train.py" in words and not is_offline(words):
            configuration.check_command_line(train_overrides(words))
            checked += 1
        elif words[:2] == ["python", "eval.py"] and not (folder / words[2].split("=", 1)[1]).is_dir():
            eval_script.load_config(folder / "runs" / "dpo", "config", words[3:])
            checked += 1
        elif words[:2] == ["python", "loop.py"]:   # tests/test_loop.py runs loop.py's rounds end to end
            configuration.check_overrides(words[2:], config_name="loop")
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("command", [c for c in commands() if "compare.py" in c or "label.py" in c])
def test_judge_and_labeller_commands_parse(command):
    """compare.py and label.py need a judge endpoint or a reward model (tests/test_compare.py and
    tests/test_label.py run them against a local server and real runs); the README's flags must be their own."""
    import compare
    import label

    words = command.split()
    script = "compare.py" if "compare.py" in words else "label.py"
    parser = (compare if script == "compare.py" else label).build_parser()
    parser.parse_args(words[words.index(script) + 1:])
