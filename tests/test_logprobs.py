"""The packed, prefix-shared forward equals the plain padded forward (values, hidden states, gradients) for
every DataLoader's layout; its layout invariants; the model-FLOP accounting of throughput.py."""

import math

import pytest
import torch
from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM)

import dataloader as dl
from feedbackalign import logprobs
from feedbackalign import models
from feedbackalign import throughput
from feedbackalign.batches import Sequence
from feedbackalign.errors import ConfigError
from feedbackalign.task import get_wordsort

PAD = 1
ATOL = 1e-5  # per-token log-prob tolerance between layouts (fp32)


@pytest.fixture(scope="module")
def model():
    return models.build_model("tiny", torch.float32, seed=0)


def small_llama(seed=0, attention="sdpa", **overrides):
    """A real Llama, smaller than `tiny` (the tests check the layout's math, not the model's size)."""
    config = LlamaConfig(**{**models.architecture_config("tiny").to_dict(), "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 2, **overrides})
    config._attn_implementation = attention
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def wordsort():
    return get_wordsort("train", n_prompts=24, k=4)


def first_batch(cls, datasets, tokenizer, batch_size=4, **options):
    loader = cls(datasets, tokenizer, batch_size=batch_size, max_length=256, max_prompt_length=128, seed=0,
                 **options)
    return next(iter(loader)).sequences()


def both(model, sequences, with_hidden=False):
    return (logprobs.padded_logps(model, sequences, PAD, with_hidden),
            logprobs.packed_logps(model, sequences, with_hidden))


def assert_same(padded, packed):
    assert torch.equal(padded.mask, packed.mask)
    assert torch.allclose(padded.token_logps, packed.token_logps, atol=ATOL, rtol=0)
    assert torch.allclose(padded.sums, packed.sums, atol=ATOL * padded.mask.shape[1], rtol=0)


def logit_positions(sequences) -> int:
    """Closed form of the packed forward's LM-head positions: per prompt, its last token (shared by all its
    responses) and each distinct response's tokens but the last."""
    groups = {}
    for s in sequences:
        groups.setdefault(s.prompt_ids, set()).add(s.response_ids)
    return sum(any(rs) + sum(max(len(r) - 1, 0) for r in rs) for rs in groups.values())


def shared_tokens(sequences) -> int:
    """Closed form of what the packed forward computes: each distinct prompt once + each distinct response
    of that prompt once."""
    groups = {}
    for s in sequences:
        groups.setdefault(s.prompt_ids, set()).add(s.response_ids)
    return sum(len(p) + sum(len(r) for r in rs) for p, rs in groups.items())


# ---------------------------------------------------------------- equality with the padded forward, every loader


LOADERS = {
    "sft": (dl.SFTDataLoader, {}),
    "csft": (dl.ConditionalSFTDataLoader, {}),
    "paired": (dl.PairedPreferenceDataLoader, {}),
    "unpaired_with_kl_partners": (dl.UnpairedPreferenceDataLoader, {}),
    "k_reward": (dl.RewardDataLoader, {"n_responses": 4}),
    "judgment": (dl.JudgmentDataLoader, {}),
}


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_packed_equals_padded_for_every_loader(model, wordsort, tiny_tokenizer, name):
    cls, options = LOADERS[name]
    sequences = first_batch(cls, [wordsort], tiny_tokenizer, **options)
    with torch.no_grad():
        padded, packed = both(model, sequences)
    assert_same(padded, packed)
    assert packed.tokens == packed.positions == shared_tokens(sequences)  # no padding, prompts once
    assert packed.sequence_tokens == padded.tokens == sum(len(s.prompt_ids) + len(s.response_ids) for s in sequences)
    assert padded.positions >= padded.tokens == padded.logits
    assert packed.logits == logit_positions(sequences)


def test_prompts_are_shared_where_the_layout_repeats_them(wordsort, tiny_tokenizer):
    """A pair, a K-group and a KTO item with its KL partner each compute their prompt once."""
    for name, units in (("paired", 4), ("k_reward", 4), ("unpaired_with_kl_partners", 4)):
        cls, options = LOADERS[name]
        sequences = first_batch(cls, [wordsort], tiny_tokenizer, **options)
        layout = logprobs.pack(sequences)
        prompts = {s.prompt_ids for s in sequences}
        assert len(prompts) <= units < len(sequences)
        assert layout.input_ids.shape[1] == shared_tokens(sequences) < sum(
            len(s.prompt_ids) + len(s.response_ids) for s in sequences)


def test_real_hh_pairs_and_their_hidden_states(model, shared_data, tiny_tokenizer):
    """Real HH dialogues (long prompts truncated from the left) in both layouts, with the hidden states PPO's
    value head reads."""
    from feedbackalign.getters import get_hh

    hh = get_hh("test", data_dir=shared_data, subsets=["helpful-base"])
    sequences = first_batch(dl.PairedPreferenceDataLoader, [hh], tiny_tokenizer, batch_size=4)
    with torch.no_grad():
        padded, packed = both(model, sequences, with_hidden=True)
    assert_same(padded, packed)
    assert torch.allclose(padded.hidden[padded.mask], packed.hidden[packed.mask], atol=1e-4, rtol=0)
    assert not packed.hidden[~packed.mask].any()


def test_gradients_equal_between_layouts(wordsort, tiny_tokenizer):
    sequences = first_batch(dl.RewardDataLoader, [wordsort], tiny_tokenizer, n_responses=4)
    grads = []
    for layout in ("padded", "packed"):
        net = small_llama()
        out = logprobs.sequence_logps(net, sequences, PAD, layout)
        (out.sums * torch.linspace(-1, 1, len(sequences))).sum().backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-5, rtol=1e-4), name


def test_activation_checkpointing_recomputes_through_the_shared_attention(wordsort, tiny_tokenizer):
    """Recomputation in backward happens after the forward returned: it must take the same attention path."""
    sequences = first_batch(dl.PairedPreferenceDataLoader, [wordsort], tiny_tokenizer)
    grads = []
    for checkpointing in (False, True):
        net = small_llama()
        if checkpointing:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net.train()
        logprobs.packed_logps(net, sequences).sums.sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_grouped_query_attention():
    net = small_llama(num_key_value_heads=2)
    prompt = tuple(range(10, 30))
    sequences = [Sequence(prompt, (40, 41, 42, 0)), Sequence(prompt, (50, 0)), Sequence((7, 8), (9, 10, 0))]
    with torch.no_grad():
        assert_same(*both(net, sequences))


def test_sliding_window_models_are_exact_inside_the_window_and_refused_beyond_it():
    def mistral(window):
        torch.manual_seed(0)
        config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                               attn_implementation="sdpa")
        return MistralForCausalLM(config)
    sequences = [Sequence((5, 6, 7), (8, 9, 0)), Sequence((5, 6, 7), (10, 0))]
    with torch.no_grad():
        assert_same(*both(mistral(64), sequences))
        with pytest.raises(ConfigError, match="forward_layout=padded"):
            logprobs.packed_logps(mistral(4), sequences)


# ---------------------------------------------------------------- the layout itself


def test_pack_places_every_label_after_its_own_context():
    """The token at each predictor position is the one before the label in that sequence's own text, and the
    position id there is the label's index in the sequence minus one (positions restart after each prompt)."""
    a, b = (5, 6, 7), (20, 21)
    sequences = [Sequence(a, (8, 9, 0)), Sequence(b, (22, 0)), Sequence(a, (30, 0)), Sequence(a, (8, 9, 0)),
                 Sequence(b, ())]
    layout = logprobs.pack(sequences)
    assert layout.input_ids[0].tolist() == [5, 6, 7, 8, 9, 0, 30, 0, 20, 21, 22, 0]
    assert layout.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 0, 1, 2, 3]
    at = 0
    for s in sequences:
        text = s.prompt_ids + s.response_ids
        for k in range(len(s.response_ids)):
            where = int(layout.predictor[at + k])
            assert int(layout.input_ids[0, where]) == text[len(s.prompt_ids) + k - 1]
            assert int(layout.position_ids[0, where]) == len(s.prompt_ids) + k - 1
            assert int(layout.labels[at + k]) == s.response_ids[k]
        at += len(s.response_ids)
    # attention runs over each distinct sequence's own text, bucketed by length, never over the whole row
    rows = [[int(layout.input_ids[0, i]) for i in row] for g in layout.index.gathers for row in g]
    texts = [[5, 6, 7, 8, 9, 0], [5, 6, 7, 30, 0], [20, 21, 22, 0], [20, 21]]
    assert [r[: len(t)] for r, t in zip(rows, texts)] == texts
    assert [tuple(g.shape) for g in layout.index.gathers] == [(2, 6), (1, 4), (1, 2)]


def test_duplicates_and_empty_responses(model):
    prompt = (11, 12, 13)
    sequences = [Sequence(prompt, (14, 0)), Sequence(prompt, (14, 0)), Sequence(prompt, ()), Sequence((3,), (4, 0))]
    with torch.no_grad():
        padded, packed = both(model, sequences)
    assert_same(padded, packed)
    assert torch.equal(packed.token_logps[0], packed.token_logps[1])
    assert packed.counts.tolist() == [2, 2, 0, 2] and packed.sums[2].item() == 0.0


def test_routing_leaves_padded_forwards_and_generation_unchanged():
    net = models.build_model("tiny", torch.float32, seed=1)
    sequences = [Sequence((5, 6, 7), (8, 9, 0)), Sequence((5, 6), (10, 0))]
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = logprobs.padded_logps(net, sequences, PAD).token_logps
        generated = net.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
        logprobs.packed_logps(net, sequences)
        assert net.config._attn_implementation == "prefix_shared|sdpa"
        assert torch.equal(logprobs.padded_logps(net, sequences, PAD).token_logps, before)
        assert torch.equal(net.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=PAD), generated)
    logprobs.route_attention(net)  # idempotent
    assert net.config._attn_implementation == "prefix_shared|sdpa"
    assert "prefix_shared" not in net.config.to_json_string()  # a save_pretrained export never records it


def test_eager_models_route_back_to_their_own_eager_attention():
    net = small_llama(attention="eager")
    sequences = [Sequence((5, 6, 7), (8, 9, 0)), Sequence((5, 6, 7), (10, 0)), Sequence((3, 4), (11, 12, 0))]
    with torch.no_grad():
        before = logprobs.padded_logps(net, sequences, PAD)
        packed = logprobs.packed_logps(net, sequences)
        after = logprobs.padded_logps(net, sequences, PAD)
    assert net.config._attn_implementation == "prefix_shared|eager"
    assert_same(before, packed)
    assert torch.equal(before.token_logps, after.token_logps)


def test_empty_prompts_and_unknown_layouts_are_refused(model):
    with pytest.raises(ValueError, match="empty prompt"):
        logprobs.packed_logps(model, [Sequence((), (4, 0))])
    with pytest.raises(ConfigError, match="forward_layout=ragged is unknown"):
        logprobs.sequence_logps(model, [Sequence((3,), (4,))], PAD, layout="ragged")


def test_label_logps_is_log_softmax_across_chunks():
    torch.manual_seed(0)
    logits = torch.randn(logprobs.LOGSUMEXP_CHUNK + 3, 7) * 5
    labels = torch.randint(0, 7, (len(logits),))
    expected = torch.log_softmax(logits.double(), -1).gather(-1, labels[:, None]).squeeze(-1)
    assert torch.allclose(logprobs.label_logps(logits, labels).double(), expected, atol=1e-5)


def test_from_rows_round_trip():
    rows = [torch.tensor([-1.0, -2.0]), torch.tensor([]), torch.tensor([-3.0])]
    out = logprobs.TokenLogps.from_rows(rows)
    assert out.token_logps.tolist() == [[-1.0, -2.0], [0.0, 0.0], [-3.0, 0.0]]
    assert out.counts.tolist() == [2, 0, 1] and out.sums.tolist() == [-3.0, 0.0, -3.0]


# ---------------------------------------------------------------- throughput accounting


def linear_weights(net) -> int:
    return sum(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Linear))


def test_matmul_parameters_match_the_models_linear_layers(model):
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=256))
    assert throughput.matmul_parameters(model.config) == linear_weights(model)  # gated MLP, tied head
    assert throughput.matmul_parameters(neox.config) == linear_weights(neox)  # plain MLP, separate head


def test_flops_closed_forms(model):
    c = model.config
    n = throughput.matmul_parameters(c)
    assert throughput.forward_flops(c, 10) == 10 * 2 * n
    assert throughput.forward_flops(c, 10, logit_tokens=0) == 10 * 2 * (n - c.hidden_size * c.vocab_size)
    assert throughput.forward_flops(c, 1, context=100) - throughput.forward_flops(c, 1) == 4 * 4 * 256 * 100
    assert throughput.training_flops(c, 7, 3.0, 2) == 3 * throughput.forward_flops(c, 7, 3.0, 2)
    assert throughput.causal_context([1, 3]) == (1 + 6) / 4  # query t of a causal sequence sees t+1 keys
    assert throughput.mfu(50.0, 2.0, 100.0) == 0.25
    counts = logprobs.TokenLogps(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), tokens=9, logits=4)
    assert throughput.logps_flops(c, counts, 2.0, backward=True) == throughput.training_flops(c, 9, 2.0, 4)


def test_peak_flops_user_setting_measured_cpu_and_bad_values():
    assert throughput.peak_flops(2e12, torch.device("cpu")) == 2e12
    measured = throughput.peak_flops(None, torch.device("cpu"))
    assert math.isfinite(measured) and measured > 1e8
    with pytest.raises(ConfigError, match="peak_flops"):
        throughput.peak_flops(-1, torch.device("cpu"))
