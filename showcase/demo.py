"""`make demo`: the embedded default end to end, offline, on CPU, with a report of what each loss achieved.

    python -m showcase.demo                  # full demo -> demo_out/report/ (about 20 min on 2 CPU cores)
    python -m showcase.demo --quick          # a smoke test of every stage in a few minutes (tests/test_demo.py)
    python -m showcase.demo --runs dpo,nca   # only some alignment runs (SFT always runs: their starting point)
    python -m showcase.demo --set nca:loss.beta=0.1 --set dpo:lr=2e-4    # extra train.py overrides for one loss
    python -m showcase.demo --online none    # without the online section (loop.py)

The CPU-scale analogue of the DPO paper's controlled experiment (Rafailov et al. 2023, Sec. 6.1): the built-in
`wordsort` task (task.py) has a known true reward, so the demo measures how much each loss raises it over SFT.
Every step runs a project entry point as a subprocess, exactly as a user would:

1. `train.py loss=sft`: SFT of the embedded tiny model on the task's imperfect demonstrations;
2. `train.py loss=<L> model.load_from=<sft run>/LATEST/policy.pt`: each alignment loss from that checkpoint;
3. `eval.py ++mode=sample`: every model answers the same held-out test prompts;
4. `compare.py` (only with a judge: $OPENAI_BASE_URL or --judge-url): an LLM judge against the SFT answers;
5. `loop.py loss=<L> labeler=task model.load_from=<sft run>/LATEST/policy.pt`: online CUT, NCA and DPO, rounds
   of K=4 samples of the model's own on fresh training prompts, labelled by the task (true reward and
   critiques), one training pass each, from the previous round's policy; after each round the same held-out
   prompts as the offline runs;
6. report.py: true rewards (task.score_samples), win rates against SFT, held-out chosen log-likelihood, plots,
   and the true reward per online round next to the offline runs.

Finished stages are recorded in `<out>/stages/`; a rerun skips every stage up to the first one whose command
changed (or that never finished), so an interrupted demo resumes where it stopped. `--fresh` starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from feedbackalign.fileio import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false"}

# Alignment runs in order: run name -> (loss config, train.py overrides). Each loss trains with the tiny model's
# settings in config/tuning/tiny_<loss>.yaml (what `python train.py loss=<loss> model.load_from=...` uses too);
# the last two are DPO and NCA at the DPO paper's beta 0.1 and one lr, side by side (the NCA paper's Figure 2).
RUNS = {name: (name, []) for name in ("dpo", "kto", "nca", "infonca", "cut", "ipo", "cdpo", "ncapair", "slic",
                                      "simpo", "orpo")}
RUNS.update({"dpo-beta0.1": ("dpo", ["loss.beta=0.1", "model.lr=1e-4"]),
             "nca-beta0.1": ("nca", ["loss.beta=0.1", "model.lr=1e-4"])})
QUICK_RUNS = ("dpo", "nca", "kto", "cut")

# Online loops (loop.py) from the SFT checkpoint: run name -> its loss, trained with that loss's settings (the tiny
# model's config/tuning/tiny_<loss>.yaml, as offline). Every round samples ONLINE_K answers per training prompt (the K NCA's groups need; DPO pairs the best
# with the worst; CUT learns from the critiques of the faulty ones); the task labels them.
ONLINE_RUNS = {"online-cut": "cut", "online-nca": "nca", "online-dpo": "dpo"}
ONLINE_K = 4


def merged(*override_lists: list[str]) -> list[str]:
    """Hydra overrides with one value per key: a later KEY=VALUE replaces an earlier one in place."""
    out: dict[str, str] = {}
    for item in (o for overrides in override_lists for o in overrides):
        out[item.split("=", 1)[0]] = item
    return list(out.values())


@dataclass(frozen=True)
class Scale:
    """How much of everything: the full demo or the quick one the tests run."""

    sft_examples: int
    align_examples: int
    eval_every: int
    n_eval_examples: int     # held-out prompts of the in-training evaluations = the report's log p(chosen) prompts
    eval_batch_size: int     # divides n_eval_examples, so every evaluation covers exactly those prompts
    n_samples: int
    batch_size: int
    max_new_tokens: int
    online_rounds: int             # loop.py rounds after round 0
    online_prompts: int            # training prompts sampled per round (K answers each)
    online_epochs: int             # passes over a round's labelled samples
    online_batch_size: int         # smaller than offline: a round has only online_prompts prompts
    options: tuple[str, ...] = field(default=())   # extra overrides for every train.py run


FULL = Scale(sft_examples=9600, align_examples=1920, eval_every=320, n_eval_examples=200, eval_batch_size=40,
             n_samples=200, batch_size=32, max_new_tokens=32, online_rounds=3, online_prompts=128,
             online_epochs=2, online_batch_size=16)
# --quick is a smoke test: every stage runs, in minutes, on budgets far too small to train anything (SFT sees 192
# examples), so its report and console say SMOKE TEST and its numbers are not results.
QUICK = Scale(sft_examples=192, align_examples=48, eval_every=24, n_eval_examples=16, eval_batch_size=16,
              n_samples=16, batch_size=16, max_new_tokens=16, online_rounds=2, online_prompts=8,
              online_epochs=1, online_batch_size=4, options=("++dataset_options.wordsort.n_prompts=64",))
SMOKE_TEST = ("every stage ran, on budgets far too small to train the model; these numbers are not results. "
              "`make demo` (without --quick) gives the real comparison.")
TEMPERATURE = 1.0      # sample the policy as trained: alignment must move the distribution, not just its mode
# One torch thread per stage, `--jobs` stages at once: the tiny model gains little from a second thread, and two
# threads on a core another process also wants stall each other (5 s/step instead of 0.5 s measured here).
STAGE_THREADS = 1
TIMES = ("wall", "cpu", "start", "end")   # a stage's record: seconds, CPU seconds, epoch start and end
PROGRESS = re.compile(r"(\d+/\d+) \[")   # tqdm's "41/100 [" in a stage's log


class DemoError(Exception):
    """A demo stage or option failed; the message names it and what to do."""


# ---------------------------------------------------------------- options


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m showcase.demo", description="The embedded default end to end, with a report.")
    p.add_argument("--out", type=Path, default=REPO / "demo_out", help="output folder (default demo_out/)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: every stage in a few minutes, numbers not meaningful (what the tests run)")
    p.add_argument("--runs", default=None,
                   help=f"comma-separated alignment runs (default: {','.join(RUNS)}; quick: {','.join(QUICK_RUNS)})")
    p.add_argument("--set", action="append", default=[], metavar="RUN:KEY=VALUE",
                   help="an extra train.py override for one run (sft, an alignment or an online run); repeatable")
    p.add_argument("--online", default=None,
                   help=f"comma-separated online loops (default: {','.join(ONLINE_RUNS)}; none: skip them)")
    p.add_argument("--judge-url", default=os.environ.get("OPENAI_BASE_URL"),
                   help="OpenAI-compatible judge URL for compare.py (default $OPENAI_BASE_URL; none: skipped)")
    p.add_argument("--judge", default=None, help="judge model name passed to compare.py (its default otherwise)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="stages run at once, one torch thread each (default: 2, or 1 on one core)")
    p.add_argument("--fresh", action="store_true", help="run every stage again, even those finished before")
    return p.parse_args(argv)


def choose_runs(args) -> list[str]:
    if args.runs is None:
        return list(QUICK_RUNS if args.quick else RUNS)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        raise DemoError(f"--runs: unknown run {', '.join(unknown) or '(none given)'}; choose from {', '.join(RUNS)}")
    return names


def choose_online(args) -> list[str]:
    if args.online is None:
        return list(ONLINE_RUNS)
    names = [n.strip() for n in args.online.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in ONLINE_RUNS]
    if unknown:
        raise DemoError(f"--online: unknown loop {', '.join(unknown)}; choose from {', '.join(ONLINE_RUNS)} or none")
    return names


def user_overrides(args, runs: list[str]) -> dict[str, list[str]]:
    """--set RUN:KEY=VALUE, grouped by run."""
    out: dict[str, list[str]] = {name: [] for name in runs}
    for item in args.set:
        name, sep, override = item.partition(":")
        if not sep or "=" not in override or name not in out:
            raise DemoError(f"--set {item!r}: write it as RUN:KEY=VALUE with RUN one of {', '.join(runs)} "
                            "(e.g. --set nca:loss.beta=0.5)")
        out[name].append(override)
    return out


# ---------------------------------------------------------------- commands


def train_command(name: str, loss: str, scale: Scale, out: Path, overrides: list[str],
                  sft_policy: Path | None) -> list[str]:
    """`python train.py` for one run: SFT from the seeded init, or a loss from the SFT checkpoint."""
    examples = scale.sft_examples if sft_policy is None else scale.align_examples
    argv = [sys.executable, "train.py", f"loss={loss}", f"exp_name={name}", f"cache_dir={out / 'runs'}",
            f"n_examples={examples}", f"eval_every={scale.eval_every}", f"n_eval_examples={scale.n_eval_examples}",
            f"model.batch_size={scale.batch_size}", f"model.eval_batch_size={scale.eval_batch_size}",
            "export_hf=false", "overwrite=true", *scale.options]
    if sft_policy is not None:
        argv.append(f"model.load_from={sft_policy}")
    return argv + overrides


def sample_command(name: str, scale: Scale, out: Path) -> list[str]:
    """`python eval.py ++mode=sample` on the run's own saved config."""
    return [sys.executable, "eval.py", f"--config-path={out / 'runs' / name}", "--config-name=config",
            "++mode=sample", f"++n_samples={scale.n_samples}", f"++samples_dir={out / 'samples'}",
            f"++temperature={TEMPERATURE}", f"++max_new_tokens={scale.max_new_tokens}",
            f"++model.eval_batch_size={min(scale.n_samples, 64)}"]


def loop_command(name: str, loss: str, scale: Scale, out: Path, overrides: list[str], sft_policy: Path,
                 fresh: bool) -> list[str]:
    """`python loop.py` for one online run: task-labelled rounds from the SFT checkpoint, evaluated on the same
    held-out prompts, sampling settings and batches as the offline runs' eval.py stage (so round 0 is the SFT row).
    The loop resumes itself after an interruption; --fresh starts it over."""
    argv = [sys.executable, "loop.py", f"loss={loss}", "labeler=task", f"exp_name={name}",
            f"cache_dir={out / 'online'}", f"model.load_from={sft_policy}", f"rounds={scale.online_rounds}",
            f"prompts_per_round={scale.online_prompts}", f"n_responses={ONLINE_K}", f"eval_prompts={scale.n_samples}",
            f"temperature={TEMPERATURE}", "top_p=0.95", f"max_new_tokens={scale.max_new_tokens}",
            f"model.eval_batch_size={min(scale.n_samples, 64)}", f"model.batch_size={scale.online_batch_size}",
            f"n_epochs={scale.online_epochs}", "export_hf=false", *scale.options]
    return argv + (["overwrite=true"] if fresh else []) + overrides


def judge_command(name: str, out: Path, url: str, judge: str | None) -> list[str]:
    """`python compare.py`: the loss's answers against the SFT model's, matched by prompt."""
    argv = [sys.executable, "compare.py", "-f", str(out / "samples" / f"{name}.json"), "-f2",
            str(out / "samples" / "sft.json"), "-ck", "policy", "-bk", "policy", "-r",
            str(out / "judge" / f"{name}.jsonl"), "--base_url", url]
    return argv + (["--judge", judge] if judge else [])


# ---------------------------------------------------------------- running stages


def die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the demo dies, even by SIGKILL (PR_SET_PDEATHSIG),
    so a killed demo leaves no training running."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)   # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt   # the runner's `finally` then stops the running stages


@dataclass
class Stage:
    """One subprocess of the pipeline and the stages whose outputs it reads."""

    name: str
    argv: list[str]
    output: Path                  # what the stage makes; a stage whose output is gone runs again
    after: tuple[str, ...] = ()


def progress_of(log: Path) -> str:
    """The last tqdm position in a stage's log ('41/100'), or '' before the first one."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    found = PROGRESS.findall(tail)
    return found[-1] if found else ""


class Runner:
    """Runs stages as subprocesses, `jobs` at a time, each logging to <out>/logs/<stage>.log, and prints
    progress every few seconds. A stage whose command matches its record in <out>/stages/ and whose
    inputs were not rebuilt in this invocation is skipped."""

    def __init__(self, out: Path, jobs: int, fresh: bool):
        self.out, self.jobs, self.fresh = out, jobs, fresh
        self.started = time.perf_counter()
        self.timings: dict[str, dict[str, float]] = {}   # stage -> wall and CPU seconds
        self.ran: set[str] = set()
        self.running: dict[str, tuple[subprocess.Popen, float]] = {}
        for folder in ("stages", "logs"):
            (out / folder).mkdir(parents=True, exist_ok=True)

    def path(self, folder: str, stage: str, suffix: str) -> Path:
        return self.out / folder / (stage.replace(" ", "_") + suffix)

    def say(self, text: str) -> None:
        clock = time.strftime("%M:%S", time.gmtime(time.perf_counter() - self.started))
        print(f"[demo {clock}] {text}", flush=True)

    def finished_before(self, stage: Stage) -> dict | None:
        """The recorded timings of an identical, finished stage whose inputs are unchanged; else None."""
        path = self.path("stages", stage.name, ".json")
        if self.fresh or self.ran & set(stage.after) or not path.is_file() or not stage.output.exists():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            return {k: record[k] for k in TIMES} if record["argv"] == stage.argv[1:] else None
        except (ValueError, KeyError, TypeError):
            return None   # an unreadable record: run the stage again

    def start(self, stage: Stage) -> None:
        self.path("stages", stage.name, ".json").unlink(missing_ok=True)
        self.ran.add(stage.name)
        log = open(self.path("logs", stage.name, ".log"), "w", encoding="utf-8")
        log.write(" ".join(stage.argv[1:]) + "\n")
        log.flush()
        env = {**os.environ, **OFFLINE}
        env.setdefault("OMP_NUM_THREADS", str(STAGE_THREADS))
        with log:
            proc = subprocess.Popen(stage.argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=die_with_parent)
        self.running[stage.name] = (proc, time.perf_counter())
        self.say(f"start {stage.name}: {' '.join(stage.argv[1:])}")

    def ended(self, proc: subprocess.Popen) -> tuple[int, float] | None:
        """(exit code, CPU seconds of user + system time) once the stage's process ended, else None."""
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == 0:
            return None
        proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode, usage.ru_utime + usage.ru_stime

    def reap(self, argv_of: dict[str, list[str]]) -> None:
        """Record the stages that ended; a failed one stops the demo with its log's last lines."""
        for name, (proc, began) in list(self.running.items()):
            result = self.ended(proc)
            if result is None:
                continue
            del self.running[name]
            code, cpu = result
            log = self.path("logs", name, ".log")
            if code != 0:
                tail = log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()[-15:]
                raise DemoError(f"stage '{name}' failed (exit {code}); the end of {log}:\n  " + "\n  ".join(tail)
                                + "\nFix it and rerun `python -m showcase.demo` (finished stages are kept)")
            self.timings[name] = {"wall": time.perf_counter() - began, "cpu": cpu, "start": time.time() -
                                  (time.perf_counter() - began), "end": time.time()}
            write_json_atomic(self.path("stages", name, ".json"), {"argv": argv_of[name][1:], **self.timings[name]})
            self.say(f"done  {name} in {self.timings[name]['wall']:.0f} s ({cpu:.0f} CPU s)")

    def run(self, stages: list[Stage], poll: float = 0.5, every: float = 15.0) -> None:
        pending = list(stages)
        argv_of = {s.name: s.argv for s in stages}
        last_status = time.perf_counter()
        try:
            while pending or self.running:
                self.reap(argv_of)
                waiting = {s.name for s in pending} | set(self.running)
                for stage in [s for s in pending if not set(s.after) & waiting]:
                    if len(self.running) >= self.jobs:
                        break
                    pending.remove(stage)
                    timings = self.finished_before(stage)
                    if timings is None:
                        self.start(stage)
                    else:
                        self.timings[stage.name] = timings
                        self.say(f"skip  {stage.name} (finished before)")
                if time.perf_counter() - last_status >= every and self.running:
                    last_status = time.perf_counter()
                    self.say(f"{len(self.timings)}/{len(stages)} done; running " + ", ".join(
                        f"{n} {progress_of(self.path('logs', n, '.log'))}".strip() for n in self.running))
                time.sleep(poll)
        finally:
            for proc, _ in self.running.values():
                proc.terminate()
                proc.wait()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(jobs: int) -> str:
    """A line naming the machine the numbers came from."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"{cpu_name()}, {os.cpu_count()} CPU cores visible, up to {jobs} stage(s) at a time with "
            + f"{threads or STAGE_THREADS} torch thread(s) each"
            + f", torch {torch.__version__}, Python {platform.python_version()}")


def plan(scale: Scale, out: Path, runs: list[str], overrides: dict[str, list[str]], args,
         online: list[str] = ()) -> list[Stage]:
    """SFT, then every alignment run from its checkpoint, each model's samples, the judge where configured, and
    the online loops."""
    def policy(name):
        return out / "runs" / name / "LATEST" / "policy.pt"

    def samples(name):
        return out / "samples" / f"{name}.json"

    stages = [Stage("train sft", train_command("sft", "sft", scale, out, overrides["sft"], None), policy("sft"))]
    stages += [Stage(f"train {n}", train_command(n, RUNS[n][0], scale, out, overrides[n], policy("sft")),
                     policy(n), ("train sft",)) for n in runs]
    stages += [Stage(f"sample {n}", sample_command(n, scale, out), samples(n), (f"train {n}",))
               for n in ["sft", *runs]]
    if args.judge_url:
        stages += [Stage(f"judge {n}", judge_command(n, out, args.judge_url, args.judge),
                         out / "judge" / f"{n}.jsonl.summary.json", (f"sample {n}", "sample sft")) for n in runs]
    stages += [Stage(f"online {n}", loop_command(n, ONLINE_RUNS[n], scale, out, overrides[n], policy("sft"),
                                                 args.fresh), out / "online" / n / "rounds.jsonl", ("train sft",))
               for n in online]
    return stages


def run_demo(args) -> Path:
    scale = QUICK if args.quick else FULL
    runs = choose_runs(args)
    online = choose_online(args)
    models = ["sft", *runs]
    extra = user_overrides(args, models + online)
    if args.jobs < 1:
        raise DemoError(f"--jobs {args.jobs}: run at least one stage at a time (--jobs 1 or more)")
    out = args.out.resolve()
    overrides = {"sft": merged(extra["sft"])}
    overrides.update({n: merged(RUNS[n][1], extra[n]) for n in runs})
    overrides.update({n: merged(RUNS[ONLINE_RUNS[n]][1], extra[n]) for n in online})
    runner = Runner(out, args.jobs, args.fresh)
    if args.quick:
        runner.say(f"SMOKE TEST (--quick): {SMOKE_TEST}")
    runner.say(f"{len(models)} models ({', '.join(models)}) on the built-in wordsort task, up to {args.jobs} stages "
               f"at a time -> {out} (logs in {out / 'logs'})")
    if args.judge_url:
        (out / "judge").mkdir(exist_ok=True)
    else:
        runner.say("no LLM judge configured (set OPENAI_BASE_URL or pass --judge-url): compare.py skipped; "
                   "the true reward scores every answer")
    runner.run(plan(scale, out, runs, overrides, args, online))
    write_json_atomic(out / "manifest.json", {
        "machine": machine(args.jobs), "runs": {n: f"runs/{n}" for n in models},
        "losses": {"sft": "sft", **{n: RUNS[n][0] for n in runs}, **{n: ONLINE_RUNS[n] for n in online}},
        "samples": {n: f"samples/{n}.json" for n in models}, "overrides": overrides, "timings": runner.timings,
        "online": {n: {"loss": ONLINE_RUNS[n], "dir": f"online/{n}"} for n in online},
        "judge": f"{args.judge or 'compare.py default'} at {args.judge_url}" if args.judge_url else None,
        "settings": {"quick": args.quick, "smoke_test": SMOKE_TEST if args.quick else None,
                     "n_samples": scale.n_samples, "n_logp_prompts": scale.n_eval_examples,
                     "temperature": TEMPERATURE, "jobs": args.jobs, "online_k": ONLINE_K,
                     **{k: getattr(scale, k) for k in ("sft_examples", "align_examples", "batch_size",
                                                       "online_rounds", "online_prompts", "online_epochs",
                                                       "online_batch_size")}},
    })
    from showcase import report

    runner.say("scoring and writing the report")
    path = report.build(out)
    print(path.read_text(encoding="utf-8"), flush=True)
    runner.say(f"done in {(time.perf_counter() - runner.started) / 60:.1f} min; report in {path.parent}")
    if args.quick:
        runner.say(f"SMOKE TEST (--quick): {SMOKE_TEST}")
    return path


def main(argv: list[str] | None = None) -> int:
    from feedbackalign.errors import DataError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        run_demo(args)
    except (DemoError, DataError) as e:
        print(f"demo: error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:   # e.g. --out is not writable
        print(f"demo: error: {e.strerror or e}: {e.filename or args.out}; choose another --out", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("demo: interrupted; rerun `python -m showcase.demo` to resume (finished stages are kept)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
