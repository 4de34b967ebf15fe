"""Online iterative alignment: rounds of sample -> label -> train -> evaluate, resumable at any point.

    python loop.py loss=cut labeler=task rounds=4 datasets=[wordsort] model.load_from=runs/sft/LATEST/policy.pt
    python loop.py loss=nca labeler=rm reward_model=runs/rm_tiny rounds=3 model.load_from=...
    OPENAI_API_KEY=... python loop.py loss=cut labeler=judge judge.mode=judgments judge.model=gpt-4o ...

Keys: every train.py key (config/config.yaml: loss, model, datasets, lr, n_epochs ...) applies to each round's
training; config/loop.yaml adds rounds, labeler, reference, prompts_per_round, n_responses, temperature, top_p,
max_new_tokens, eval_prompts, reward_model, rm_batch_size and judge.* (model, base_url, api_key_env, mode,
concurrency, max_retries, timeout).

Round 0 evaluates the starting model (model.load_from, else the base model). Round i >= 1:
1. sample: eval.py draws `n_responses` answers to each of `prompts_per_round` training prompts of `datasets` from
   round i-1's policy (prompts ordered by seed + i, so each round sees a fresh draw);
2. label: label.py's labeler (task, rm or judge) writes them as feedback records, appended per prompt;
3. train: train.py trains `loss` on that file (datasets=[jsonl:...]) from round i-1's policy, with the reference
   `reference` names: `round` (the policy the round starts from) or `start` (the loop's starting model); a round
   whose labels give the loss no training batch (e.g. every answer tied: no DPO pair) is recorded as not
   trained, with a warning, and the next round starts from the same policy;
4. evaluate: eval.py answers `eval_prompts` held-out test prompts (the same every round); their mean true reward
   (the built-in task), mean reward-model score (labeler=rm) or judge win rate against round 0 (labeler=judge)
   goes with the round's item counts and paths into `<cache_dir>/<exp_name>/rounds.jsonl`, and rounds.png
   plots it per round.
Each round lives in `<cache_dir>/<exp_name>/round-<i>/` (feedbackalign/online.py has the layout). Kill it at any
point (kill -9 included) and rerun the same command: finished rounds and stages are skipped, an interrupted
labelling labels only the missing prompts, an interrupted training resumes from its last checkpoint
(intermediate_checkpoints=N saves more often). `rounds=<more>` continues a finished loop; other keys must stay
as they were (overwrite=true starts over).

Stages run in this process, one after another, on this node: training spawns one process per visible GPU as
train.py does; under torchrun it refuses (each rank would run the whole loop). At 7B on 8 GPUs, sampling with
backend=auto uses vLLM when it is installed and the policy has a full export (a round's LATEST/hf with
export_hf=true, the default; a starting hub model without model.load_from), and the reward model or judge labels
between trainings; the reward model is loaded only for its stage.
Exit codes: 0 done; 2 a user error (one line naming the key, file or stage); 3 the judge kept failing (rerun);
130 interrupted (rerun).
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
import sys
import time
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

import compare
import eval as eval_script
import train as train_script
from feedbackalign import builders, distributed, labelers, online
from feedbackalign.configuration import compose
from feedbackalign.errors import ConfigError, DataError, UserError, one_line, report

EXIT_INCOMPLETE, EXIT_INTERRUPTED = compare.EXIT_INCOMPLETE, compare.EXIT_INTERRUPTED


class JudgeUnavailable(Exception):
    """The judge kept failing; what was judged or labelled is kept and a rerun continues."""


def load_config(overrides: list[str]):
    """config/loop.yaml (config.yaml + the loop's keys) with the command line's overrides."""
    try:
        return compose(list(overrides), config_name=online.LOOP_CONFIG)
    except (HydraException, OmegaConfBaseException) as e:
        why = " ".join(line.strip() for line in str(e).splitlines()[:2] if line.strip()) or type(e).__name__
        raise ConfigError(f"loop.py {' '.join(overrides) or '(no overrides)'}: {why}") from None


class Loop:
    """The rounds of one loop directory."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.layout = online.Layout(Path(cfg.cache_dir) / cfg.exp_name)
        self.start = str(cfg.model.load_from) if cfg.model.load_from else None
        self.began = time.perf_counter()

    def say(self, text: str) -> None:
        clock = time.strftime("%M:%S", time.gmtime(time.perf_counter() - self.began))
        print(f"[loop {clock}] {text}", flush=True)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[int, dict]:
        cfg, layout = self.cfg, self.layout
        self.check_labeler()
        if cfg.overwrite and layout.settings.is_file():
            shutil.rmtree(layout.root)
        online.claim(layout, cfg)
        records = online.read_rounds(layout)
        for i in range(cfg.rounds + 1):
            if i in records:
                self.say(f"round {i}: finished before ({layout.round(i)})")
                continue
            records[i] = self.round_zero() if i == 0 else self.round(i)
            online.append_round(layout, records[i])
            online.plot_rounds(records, layout.plot, f"{cfg.exp_name}: loss={cfg.loss.name}, labeler={cfg.labeler}")
            self.say(f"round {i} done: {summary(records[i])}")
        self.say(f"{cfg.rounds} round(s) in {layout.rounds_log}, plotted in {layout.plot}")
        return records

    def check_labeler(self) -> None:
        """Fail before any work when the labeler cannot run: the reward model's path, the judge's key."""
        if self.cfg.labeler == "rm":
            labelers.reward_model_dir(self.cfg.reward_model)
        if self.cfg.labeler == "judge":
            compare.api_key(self.cfg.judge.api_key_env)

    def round_zero(self) -> dict:
        self.say(f"round 0: evaluating the starting model ({self.start or self.cfg.model.name_or_path})")
        return {"round": 0, **self.evaluate(0), "paths": {"eval_samples": str(self.layout.eval_samples(0))}}

    def round(self, i: int) -> dict:
        cfg, layout = self.cfg, self.layout
        seconds = {}
        started = time.perf_counter()
        if not layout.samples(i).is_file():
            self.say(f"round {i}: sampling {cfg.n_responses} responses to {cfg.prompts_per_round} training prompts")
            self.sample(i - 1, split="train", n_prompts=cfg.prompts_per_round, n_responses=cfg.n_responses,
                        seed=cfg.seed + i, out=layout.samples(i))
        seconds["sample"] = time.perf_counter() - started
        started = time.perf_counter()
        if not layout.done(i, "label").is_file():
            self.say(f"round {i}: labelling with labeler={cfg.labeler} -> {layout.feedback(i)}")
            self.label(i)
        seconds["label"] = time.perf_counter() - started
        started = time.perf_counter()
        if not layout.done(i, "train").is_file():
            self.train(i)
        seconds["train"] = time.perf_counter() - started
        started = time.perf_counter()
        metrics = self.evaluate(i)
        seconds["evaluate"] = time.perf_counter() - started
        labelled = labelers.records(layout.feedback(i))
        scores = [s for r in labelled for s in r.get("scores") or []]
        return {"round": i, "items": len(labelled), "responses": sum(len(r["responses"]) for r in labelled),
                "trained": layout.trained(i),
                **({"samples_mean_score": sum(scores) / len(scores)} if scores else {}), **metrics,
                "paths": {"samples": str(layout.samples(i)), "feedback": str(layout.feedback(i)),
                          "run": str(layout.run(i)), "eval_samples": str(layout.eval_samples(i))},
                "seconds": {k: round(v, 1) for k, v in seconds.items()}}

    # ------------------------------------------------------------------ stages

    def sample(self, after_round: int, *, split: str, n_prompts: int, n_responses: int, seed: int, out: Path):
        """eval.py's sampling of the policy after `after_round` (round 0: the starting model)."""
        scfg = online.sampling_config(self.cfg, eval_script.DEFAULTS, policy=self.layout.policy(after_round,
                                      self.start), split=split, n_prompts=n_prompts, n_responses=n_responses,
                                      seed=seed)
        eval_script.check_settings(scfg)
        with stage(f"sampling {out}"):
            eval_script.sample(scfg, None, out=out)
        builders.release_memory()

    def make_labeler(self):
        cfg = self.cfg
        if cfg.labeler == "task":
            return labelers.TaskLabeler(), None
        if cfg.labeler == "rm":
            return labelers.RewardModelLabeler(cfg.reward_model, cfg.rm_batch_size), None
        j = cfg.judge
        judge, client, _ = labelers.make_judge(j.model, j.base_url, j.api_key_env, j.timeout, j.max_retries,
                                               seed=cfg.seed)
        return labelers.JudgeLabeler(judge, j.mode, j.concurrency, judge.stop), client

    def label(self, i: int) -> None:
        labeler, client = self.make_labeler()
        try:
            with stage(f"labelling round {i}"):
                result = labelers.label_file(self.layout.samples(i), self.layout.feedback(i), labeler)
        finally:
            if client is not None:
                client.close()
            del labeler
            builders.release_memory()
        o = result.outcome
        if o.fatal or o.write_error:
            raise ConfigError(f"round {i}, labelling: {o.fatal or o.write_error}")
        if o.exhausted or o.interrupted:
            raise JudgeUnavailable(f"round {i}, labelling: {o.exhausted or 'interrupted'}; "
                                   f"{result.labelled + result.already} of {result.items} prompts are labelled in "
                                   f"{self.layout.feedback(i)}: rerun the same command to continue")
        online.mark_done(self.layout, i, "label", {"items": result.items, "labelled": result.labelled + result.already,
                                                   "unlabelled": result.unlabelled,
                                                   "empty_responses": result.empty_responses})

    def train(self, i: int) -> None:
        layout = self.layout
        resume = (layout.run(i) / "LATEST" / "trainer_state.json").is_file()
        tcfg = online.round_train_config(self.cfg, layout, i, self.start, resume)
        try:   # the labels may give the loss nothing to train on (every answer tied: no DPO pair)
            builders.build_loader(tcfg, builders.build_tokenizer(tcfg), split="train", train=True)
        except DataError as e:
            self.say(f"round {i}: WARNING not trained, the policy stays {tcfg.model.load_from or 'the base model'}: "
                     f"{one_line(e)}")
            online.mark_done(layout, i, "train", {"trained": False, "why": one_line(e)})
            return
        self.say(f"round {i}: {'resuming' if resume else 'training'} loss={self.cfg.loss.name} on "
                 f"{layout.feedback(i).name} from {tcfg.model.load_from or 'the base model'} -> {layout.run(i)}")
        with stage(f"round {i}, training ({layout.run(i)})"):
            train_script.launch(tcfg)
        builders.release_memory()
        online.mark_done(layout, i, "train", {"run": str(layout.run(i))})

    def evaluate(self, i: int) -> dict:
        """Sample the held-out prompts with the policy after round i (once) and measure it."""
        cfg, layout = self.cfg, self.layout
        out = layout.eval_samples(i)
        if not out.is_file():
            self.say(f"round {i}: answering {cfg.eval_prompts} held-out prompts")
            self.sample(i, split="test", n_prompts=cfg.eval_prompts, n_responses=1, seed=cfg.seed, out=out)
        samples = json.loads(out.read_text(encoding="utf-8"))["samples"]
        metrics = online.true_reward(samples)
        if cfg.labeler == "rm":
            metrics["rm_score"] = self.rm_score(samples)
        if cfg.labeler == "judge" and i > 0:
            metrics.update(self.win_rate(i))
        return metrics

    def rm_score(self, samples: list[dict]) -> float:
        scorer = labelers.RewardModelLabeler(self.cfg.reward_model, self.cfg.rm_batch_size)
        items = [labelers.Item(s["id"], s["prompt_turns"], (s["policy"],), s["dataset"], 0) for s in samples
                 if s["policy"].strip()]
        values = [v for chunk in scorer.chunks(items)
                  for v in scorer.scores([scorer.input_ids(c.turns, c.responses[0]) for c in chunk])]
        del scorer
        builders.release_memory()
        return sum(values) / len(values) if values else float("nan")

    def win_rate(self, i: int) -> dict:
        """compare.py, both orders: round i's held-out answers against round 0's, resumable in judge.jsonl."""
        j, layout = self.cfg.judge, self.layout
        results = layout.judge_results(i)
        argv = ["-f", str(layout.eval_samples(i)), "-f2", str(layout.eval_samples(0)), "-ck", "policy", "-bk",
                "policy", "-r", str(results), "--judge", j.model, "--api_key_env", j.api_key_env, "--concurrency",
                str(j.concurrency), "--max_retries", str(j.max_retries), "--timeout", str(j.timeout)]
        code = compare.main(argv + (["--base_url", j.base_url] if j.base_url else []))
        if code == compare.EXIT_INCOMPLETE or code == compare.EXIT_INTERRUPTED:
            raise JudgeUnavailable(f"round {i}, judging against round 0: comparisons remain (see {results}): rerun "
                                   "the same command to continue")
        if code != compare.EXIT_OK:
            raise ConfigError(f"round {i}, judging against round 0 failed (compare.py's message above; {results})")
        s = json.loads(results.with_name(results.name + ".summary.json").read_text(encoding="utf-8"))
        return {"judge_win_rate": s["win"]["rate"], "judge_win_rate_ci95": s["win"]["ci95"],
                "judge_tie_rate": s["tie"]["rate"]}


@contextmanager
def stage(name: str):
    """Prefix a user error raised inside a stage with the stage's name (its kind is kept)."""
    try:
        yield
    except UserError as e:
        raise type(e)(f"{name}: {one_line(e)}") from None


def summary(record: dict) -> str:
    parts = [f"{name} {record[name]:.3f}" for name in online.METRICS if record.get(name) is not None]
    if "items" in record:
        parts.append(f"{record['items']} prompts / {record['responses']} responses labelled")
    if record.get("trained") is False:
        parts.append("NOT TRAINED (no training batch in its labels)")
    return ", ".join(parts) or "no metric (labeler gives none)"


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit code (2 with one `loop.py: error:` line for anything the user can fix)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    try:
        if distributed.world_from_env() is not None:
            raise ConfigError("loop.py runs its stages on one node and starts train.py's processes itself: launch "
                              "it with python, not torchrun")
        options = [a for a in argv if a.startswith("-")]
        if options:
            raise ConfigError(f"unknown option {options[0]}: loop.py takes key=value overrides (python loop.py "
                              "--help)")
        cfg = load_config(argv)
        online.check_loop_settings(cfg)
        Loop(cfg).run()
    except UserError as e:
        return report("loop.py", one_line(e))
    except JudgeUnavailable as e:
        return report("loop.py", str(e), EXIT_INCOMPLETE)
    except KeyboardInterrupt:
        print("loop.py: interrupted; rerun the same command to continue (finished stages are kept)", file=sys.stderr,
              flush=True)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
