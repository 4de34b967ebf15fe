"""Rebuild assets/tiny/tokenizer.json: the embedded tiny model's byte-level BPE (vocab 4096).

Trained once on English text from the shared data samples plus digits and punctuation, then committed, so
the tiny model needs no download. Usage: python tools/build_tiny_tokenizer.py [shared_data_dir]
"""

import gzip
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|good|>", "<|bad|>"]
VOCAB_SIZE = 4096


def corpus(data_dir: Path):
    for sub in ("harmless-base", "helpful-base"):
        with gzip.open(data_dir / "hh_rlhf" / sub / "test.jsonl.gz", "rt", encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                yield rec["chosen"]
                yield rec["rejected"]
    for it in (1, 2):
        for rec in json.loads((data_dir / "cut_judgments" / "iter" / f"train-alpaca-sample-iter{it}.json").read_text()):
            yield " ".join(filter(None, [rec["instruction"], rec["input"], rec["output"], rec["judgment"]]))
    yield " ".join(str(i) for i in range(1000))


def main() -> None:
    data_dir = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "data")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(data_dir), trainer=trainer)
    out = Path(__file__).resolve().parents[1] / "feedbackalign" / "assets" / "tiny" / "tokenizer.json"
    tok.save(str(out))
    print(f"wrote {out} (vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
