"""The command line and the order of checks: unknown keys and names fail fast with a suggestion (`+`/`++`
included), under torchrun once; names and keys, then values, models, data, and the run directory last; an offline
hub model reports every missing piece at once, checked against the real Hugging Face cache layout."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from feedbackalign import builders, configuration, models
from feedbackalign.errors import CheckpointError, ConfigError, DataError, EnvError
from helpers import REPO, make_config, make_trainer, run_script


def check(*argv):
    configuration.check_command_line(list(argv))


# ---------------------------------------------------------------- keys and names


@pytest.mark.parametrize("argv, message", [
    (["+beta=0.5"], "+beta=0.5: there is no key 'beta' (loss.beta exists with loss=cdpo|dpo|grpo|infonca|kto|nca|"),
    (["loss=dpo", "+beta=0.5"], "there is no key 'beta' (did you mean loss.beta?)"),
    (["loss=dpo", "+loss.betta=0.5"], "there is no key 'loss.betta' (did you mean loss.beta?)"),
    (["loss=dpo", "++loss.betta=0.5"], "there is no key 'loss.betta' (did you mean loss.beta?)"),
    (["model.batchsize=8"], "did you mean model.batch_size"),
    (["~model.lr_typo"], "there is no key 'model.lr_typo'"),
    (["loss=dpo", "+loss.beta=0.5"], "loss.beta already exists; set it without the +: loss.beta=0.5"),
    (["dataset_options.wordsort.n_prompts=8"], "needs a +: +dataset_options.wordsort.n_prompts=8"),
    (["loss=nsa"], "there is no loss 'nsa' (did you mean nca?); valid loss names: cdpo, csft, cut, dpo,"),
    (["--multirun", "loss=dpo,nsa"], "there is no loss 'nsa'"),
    (["lr=[1"], "cannot read the override 'lr=[1'"),
])
def test_unknown_keys_and_names_fail_with_a_suggestion(argv, message):
    with pytest.raises(ConfigError) as caught:
        check(*argv)
    assert message in str(caught.value)


def test_model_names_are_the_model_files_without_the_base():
    with pytest.raises(ConfigError) as caught:
        check("model=mistral")
    text = str(caught.value)
    assert "did you mean mistral7b?" in text and "tiny" in text and "base_model" not in text
    with pytest.raises(ConfigError, match="there is no model 'base_model'"):
        check("model=base_model")


@pytest.mark.parametrize("argv", [
    ["loss=dpo", "loss.beta=0.3", "++loss.beta=0.2", "+dataset_options.wordsort.n_prompts=8"],
    ["loss=sft", "+loss.data.anything=1"],          # loss.data's keys are the DataLoader's to check (it lists them)
    ["datasets=[hh,shp]", "datasets.1=oasst", "~tuning", "hydra.verbose=true", "hydra/job_logging=none"],
    ["--multirun", "loss=dpo,nca", "loss.beta=0.5"],
    ["--cfg", "job", "model=mistral7b", "model.lora.enabled=true"],
])
def test_valid_command_lines_pass(argv):
    check(*argv)


def test_compose_checks_what_it_composes(tmp_path):
    """Every entry point that composes through configuration.compose gets the check (eval.py, label/loop scripts)."""
    with pytest.raises(ConfigError, match="did you mean loss.beta"):
        make_config(tmp_path, "loss=kto", "++loss.bta=1")


def test_train_py_rejects_a_typo_before_hydra_adds_it(tmp_path):
    result = run_script(str(REPO / "train.py"), "+beta=0.5", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("train.py: error: +beta=0.5: there is no key 'beta' (loss.beta exists with loss=")
    assert not any(tmp_path.iterdir())


def test_torchrun_prints_an_unknown_name_once(tmp_path):
    """Both ranks stop with exit code 2 before any process group exists; only rank 0 prints the line."""
    from feedbackalign import distributed

    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                        "--master_port", str(distributed.free_port()), str(REPO / "train.py"), "loss=nsa",
                        cwd=tmp_path, timeout=180)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(ours) == 1 and "there is no loss 'nsa' (did you mean nca?)" in ours[0]
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- order of checks


def test_a_bad_dataset_is_reported_before_an_existing_run_directory(tmp_path):
    (tmp_path / "sft_tiny").mkdir()
    (tmp_path / "sft_tiny" / "config.yaml").write_text("old run\n")
    with pytest.raises(DataError, match="unknown dataset 'hhh'"):
        make_trainer(tmp_path, "datasets=[hhh]")
    with pytest.raises(CheckpointError, match="model.load_from: .*nope.pt does not exist"):
        make_trainer(tmp_path, "loss=dpo", f"model.load_from={tmp_path / 'nope.pt'}")
    with pytest.raises(ConfigError, match="run directory .* already exists"):
        make_trainer(tmp_path)
    assert (tmp_path / "sft_tiny" / "config.yaml").read_text() == "old run\n"


def test_a_small_train_split_names_model_batch_size(tmp_path):
    """(A small eval split is evaluated whole: tests/test_reliability.py.)"""
    with pytest.raises(DataError, match=r"\(model.batch_size=8\) on split 'train'; lower model.batch_size"):
        make_trainer(tmp_path, "++dataset_options.wordsort.n_prompts=4")
    assert not any(tmp_path.iterdir())


def test_a_jsonl_dataset_takes_options_by_its_kind(tmp_path):
    """`jsonl:<path>` cannot be a command-line key; dataset_options.jsonl applies to every user file."""
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}", "responses": ["a", "b"], "pairs": [[0, 1]]}) + "\n"
                            for i in range(20)))
    everything = make_config(tmp_path, f"datasets=[jsonl:{data}]", "+dataset_options.jsonl.test_fraction=1.0")
    default = make_config(tmp_path, f"datasets=[jsonl:{data}]")
    assert len(builders.load_datasets(everything, "test")[0].examples) == 20
    assert len(builders.load_datasets(default, "test")[0].examples) < 20


# ---------------------------------------------------------------- models that cannot be loaded offline


def hub_snapshot(cache, repo_id: str) -> Path:
    """The folder the Hugging Face cache keeps a repository's files in (refs/main -> snapshots/<commit>/)."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def test_offline_hub_model_reports_every_missing_piece_at_once(tmp_path, monkeypatch, tiny_tokenizer):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = make_config(tmp_path, "model=mistral7b")
    with pytest.raises(EnvError) as caught:
        models.check_available(cfg.model)
    text = str(caught.value)
    assert "the weights 'mistralai/Mistral-7B-v0.1' (model.name_or_path=" in text
    assert "the tokenizer 'mistralai/Mistral-7B-v0.1' (model.tokenizer_name_or_path=" in text
    assert "huggingface-cli download" in text and "\n" not in text

    tiny_tokenizer.save_pretrained(hub_snapshot(tmp_path / "hub", "mistralai/Mistral-7B-v0.1"))
    with pytest.raises(EnvError) as caught:
        models.check_available(cfg.model)
    assert "weights" in str(caught.value) and "tokenizer" not in str(caught.value)

    missing_dir = make_config(tmp_path, f"model.name_or_path={tmp_path / 'no_such_model'}",
                              "model.tokenizer_name_or_path=tiny")
    with pytest.raises(EnvError, match="no_such_model' .*no such directory"):
        models.check_available(missing_dir.model)


def test_a_model_in_the_offline_cache_passes_the_check_and_trains(tmp_path, monkeypatch):
    """What the check accepts, from_pretrained really loads offline: a sharded save_pretrained model and its
    tokenizer in the Hugging Face cache layout, trained by train.py with HF_HUB_OFFLINE=1; without one shard the
    check names it."""
    snapshot = hub_snapshot(tmp_path / "hub", "someone/tiny-llama")
    models.build_model("tiny", torch.float32).save_pretrained(snapshot, max_shard_size="8MB")
    models.load_tokenizer("tiny").save_pretrained(snapshot)
    assert (snapshot / "model.safetensors.index.json").is_file()
    run = ["loss=sft", "model.name_or_path=someone/tiny-llama", "n_examples=8", "model.batch_size=8",
           "n_eval_examples=0", "export_hf=false", "++dataset_options.wordsort.n_prompts=16",
           f"cache_dir={tmp_path / 'runs'}"]
    result = run_script(str(REPO / "train.py"), *run, cwd=tmp_path, env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert result.returncode == 0, result.stderr[-2000:]
    shard = sorted(snapshot.glob("model-*.safetensors"))[-1]
    shard.unlink()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EnvError) as caught:
        models.check_available(make_config(tmp_path, *run).model)
    assert f"not in the local Hugging Face cache (HF_HUB_OFFLINE=1): {shard.name}" in str(caught.value)
    assert "model.name_or_path" in str(caught.value) and "tokenizer" not in str(caught.value)
