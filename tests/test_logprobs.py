"""The packed, prefix-shared forward equals the plain padded forward (values, hidden states, gradients) for
every DataLoader's layout, on both attention paths (SDPA per sequence; FlexAttention's block mask, forward only on
CPU) and under a token budget that splits a microbatch into several forwards; the chunked LM-head log-probs and
their gradients; that no (labels x vocab) tensor is kept for backward; its layout invariants; the model-FLOP
accounting of throughput.py."""

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
        flex = logprobs.packed_logps(model, sequences, attention="flex")
        budget = max(len(s.prompt_ids) + len(s.response_ids) for s in sequences)
        split = logprobs.packed_logps(model, sequences, max_tokens=budget)
    for other in (packed, flex, split):
        assert_same(padded, other)
    assert packed.tokens == packed.positions == flex.tokens == shared_tokens(sequences)  # no padding, prompts once
    assert packed.sequence_tokens == padded.tokens == sum(len(s.prompt_ids) + len(s.response_ids) for s in sequences)
    assert padded.positions >= padded.tokens == padded.logits
    assert packed.logits == logit_positions(sequences)
    assert split.tokens == sum(shared_tokens([sequences[i] for i in f])
                               for f in logprobs.forward_split(sequences, budget)) >= packed.tokens


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


def test_gradients_equal_between_layouts_and_token_budgets(wordsort, tiny_tokenizer):
    """Padded, packed in one forward, and packed in forwards of at most 40 tokens (groups cut between their
    responses): the same parameter gradients."""
    sequences = first_batch(dl.RewardDataLoader, [wordsort], tiny_tokenizer, n_responses=4)
    assert len(logprobs.forward_split(sequences, 40)) > len({s.prompt_ids for s in sequences})
    grads = []
    for layout, budget in (("padded", None), ("packed", None), ("packed", 40)):
        net = small_llama()
        out = logprobs.sequence_logps(net, sequences, PAD, layout, max_tokens=budget)
        (out.sums * torch.linspace(-1, 1, len(sequences))).sum().backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    for other in grads[1:]:
        for name, g in grads[0].items():
            assert torch.allclose(g, other[name], atol=1e-5, rtol=1e-4), name


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


def test_grouped_query_attention_on_both_paths():
    """K/V heads shared by query heads: repeated for SDPA, read in place by FlexAttention (enable_gqa)."""
    net = small_llama(num_key_value_heads=2)
    prompt = tuple(range(10, 30))
    sequences = [Sequence(prompt, (40, 41, 42, 0)), Sequence(prompt, (50, 0)), Sequence((7, 8), (9, 10, 0))]
    with torch.no_grad():
        padded, packed = both(net, sequences)
        assert_same(padded, packed)
        assert_same(padded, logprobs.packed_logps(net, sequences, attention="flex"))


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
    index = layout.index
    rows = [[int(layout.input_ids[0, i]) for i in row] for g in index.gathers for row in g]
    texts = [[5, 6, 7, 8, 9, 0], [5, 6, 7, 30, 0], [20, 21, 22, 0], [20, 21]]
    assert [r[: len(t)] for r, t in zip(rows, texts)] == texts
    assert [tuple(g.shape) for g in index.gathers] == [(2, 6), (1, 4), (1, 2)]


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


# ---------------------------------------------------------------- bounded memory: token budget, LM head, attention


def test_forward_split_keeps_groups_whole_within_the_budget():
    """Whole prompt groups in order while the packed row fits; a group above the budget is cut between its
    distinct responses (its prompt repeated, duplicates kept together); a sequence above it runs alone."""
    a, b, c = (1,) * 10, (2,) * 4, (3,) * 30
    sequences = [Sequence(a, (5,) * 6), Sequence(a, (6,) * 6), Sequence(b, (7,) * 3), Sequence(a, (5,) * 6),
                 Sequence(c, (8,) * 20), Sequence(b, (9,) * 12), Sequence(a, (10,) * 9)]
    assert logprobs.forward_split(sequences, None) == [list(range(7))]
    assert logprobs.forward_split(sequences, 1000) == [list(range(7))]
    # a: 10 + 6 + 6 + 9 = 31 > 25 -> [0, 1, 3] (22) and [6] (19); b: 4 + 3 + 12 = 19; c: 50 alone
    assert logprobs.forward_split(sequences, 25) == [[0, 1, 3], [6], [2, 5], [4]]
    for indices in logprobs.forward_split(sequences, 25):
        part = [sequences[i] for i in indices]
        assert logprobs.packed_tokens(part) <= 25 or len({s.response_ids for s in part}) == 1
    assert sorted(i for f in logprobs.forward_split(sequences, 7) for i in f) == list(range(7))


def test_forwards_agreed_across_ranks_add_zero_weight_forwards():
    """A rank that must run more forwards than its own split (FSDP: every rank the same number) runs extra
    forwards of its shortest sequence: same values and gradients, their tokens counted as computed."""
    sequences = [Sequence((5, 6, 7), (8, 9, 0)), Sequence((5, 6, 7), (10, 0)), Sequence((3, 4), (11, 12, 0))]
    results = []
    for forwards in (1, 3):
        net = small_llama()
        out = logprobs.packed_logps(net, sequences, forwards=forwards)
        (out.sums * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        results.append((out, torch.cat([p.grad.reshape(-1) for p in net.parameters()])))
    (one, grad_one), (three, grad_three) = results
    assert torch.equal(one.token_logps, three.token_logps) and torch.allclose(grad_one, grad_three, atol=1e-7)
    assert three.tokens == one.tokens + 2 * 5 and logprobs.forward_count(sequences, max_tokens=6) == 3


def test_flex_block_mask_is_the_per_sequence_causal_mask():
    """The block mask's elements are exactly 'key of my own sequence, not after me' (prompt + own response),
    across tile boundaries; its tiles equal torch's create_block_mask of the same mask function."""
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    g = torch.Generator().manual_seed(0)

    def ids(n):
        return tuple(torch.randint(5, 90, (n,), generator=g).tolist())

    sequences = [Sequence(p, ids(n)) for p, ns in ((ids(70), (90, 30, 150)), (ids(5), (3,)), (ids(140), (60, 61)))
                 for n in ns]
    layout = logprobs.pack(sequences)
    total = layout.input_ids.shape[1]
    block_mask = layout.mask(torch.device("cpu")).block_mask
    expected = torch.zeros(total, total, dtype=torch.bool)
    for at, p, start, n in layout.spans:  # each (prompt, response) sequence: causal over its own positions
        row = torch.cat([torch.arange(at, at + p), torch.arange(start, start + n)])
        expected[row.unsqueeze(1), row.unsqueeze(0)] = torch.ones(len(row), len(row), dtype=torch.bool).tril()
    assert torch.equal(create_mask(block_mask.mask_mod, 1, 1, total, total, device="cpu")[0, 0], expected)
    reference = create_block_mask(block_mask.mask_mod, None, None, total, total, device="cpu")
    assert torch.equal(block_mask.to_dense(), reference.to_dense())
    assert torch.equal(block_mask.full_kv_num_blocks, reference.full_kv_num_blocks)


def test_flex_refuses_to_train_on_cpu_and_unknown_paths_are_named(model):
    sequences = [Sequence((3, 4), (5, 0))]
    with pytest.raises(ConfigError, match="packed_attention=flex trains on CUDA only"):
        logprobs.packed_logps(model, sequences, attention="flex")
    with pytest.raises(ConfigError, match="packed_attention=ring is unknown"):
        logprobs.packed_logps(model, sequences, attention="ring")


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_label_logps_and_their_gradients(monkeypatch, bias):
    """Several chunks (LOGITS_CHUNK_BYTES lowered): log softmax(h W^T + b)[y] and d/dh, d/dW, d/db equal the
    plain full-logits computation (float64 gradcheck, and against autograd of the plain form)."""
    monkeypatch.setattr(logprobs, "LOGITS_CHUNK_BYTES", 4 * 11 * 3)  # 3 rows per chunk of an 11-token vocab
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 11, bias=bias).double()
    hidden = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (10,))
    weights = torch.randn(10, dtype=torch.float64)
    values = logprobs.linear_label_logps(hidden, head, labels)
    plain = torch.log_softmax(head(hidden), -1).gather(-1, labels[:, None]).squeeze(-1)
    assert torch.allclose(values, plain)
    got = torch.autograd.grad((values * weights).sum(), [hidden, *head.parameters()])
    want = torch.autograd.grad((plain * weights).sum(), [hidden, *head.parameters()])
    for a, b in zip(got, want):
        assert torch.allclose(a, b)
    assert torch.autograd.gradcheck(lambda h, w: logprobs.LinearLabelLogps.apply(h, w, head.bias, labels,
                                                                                   torch.float64),
                                    (hidden, head.weight.detach().clone().requires_grad_()))


def test_chunked_label_logps_compute_in_autocasts_dtype():
    """Under bf16 autocast the head's matmul runs in bf16 (like autocast's F.linear), the log-softmax in fp32, and
    the fp32 weight gets an fp32 gradient."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 300, bias=False)
    hidden = torch.randn(40, 64)
    labels = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = logprobs.linear_label_logps(hidden, head, labels)
        logits = head(hidden)
    assert logits.dtype == torch.bfloat16 and values.dtype == torch.float32
    assert torch.allclose(values, torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None]).squeeze(-1),
                          atol=1e-6)
    values.sum().backward()
    assert head.weight.grad.dtype == torch.float32


def saved_for_backward(function) -> list[tuple[int, ...]]:
    """Shapes of the non-parameter tensors autograd saves while `function` runs."""
    shapes = []

    def keep(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        function()
    return shapes


def test_no_labels_by_vocab_tensor_is_kept_for_backward(model, wordsort, tiny_tokenizer):
    """What the packed forward keeps for backward has no vocabulary-sized dimension (the LM head keeps its hidden
    rows and one logsumexp per label); the padded forward, by contrast, keeps (labels x vocab) fp32 logits for
    the logsumexp's backward."""
    sequences = first_batch(dl.PairedPreferenceDataLoader, [wordsort], tiny_tokenizer, batch_size=8)
    vocab = model.config.vocab_size
    packed = saved_for_backward(lambda: logprobs.packed_logps(model, sequences))
    padded = saved_for_backward(lambda: logprobs.padded_logps(model, sequences, PAD))
    assert packed and not [s for s in packed if vocab in s]
    assert (sum(len(s.response_ids) for s in sequences), vocab) in padded


def test_a_head_with_lora_adapters_computes_its_logits():
    """An LM head that is not a plain Linear (LoRA adapters on lm_head) takes the logits path: still the padded
    values and gradients."""
    from peft import LoraConfig, get_peft_model

    sequences = [Sequence((5, 6, 7), (8, 9, 0)), Sequence((5, 6, 7), (10, 0)), Sequence((3, 4), (11, 12, 0))]
    grads = []
    for layout in ("padded", "packed"):
        net = get_peft_model(small_llama(), LoraConfig(r=2, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
        out = logprobs.sequence_logps(net, sequences, PAD, layout)
        out.sums.sum().backward()
        grads.append((out.token_logps.detach(), [p.grad for p in net.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=ATOL)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


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
