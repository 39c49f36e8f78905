"""Sampling (temperature > 0) stays lossless: statistical tests against exact target distributions.

Tiny vocabularies (4-8 tokens) make the exact distribution of the first k generated tokens
enumerable (chain rule over target-only probabilities), so the empirical joint distribution of k
tokens under serial tree speculation is compared with the exact one by a chi-square test (cells
with an expected count under 5 pooled). Seeds are fixed (SamplingParams(seed=i) for sample i), so
every statistic is deterministic. A meta-test swaps in a naive, lossy verifier and checks that the
same statistic rejects it, so the test has power.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from specmesh.services.runtime import target_session
from specmesh.services.runtime.tree_params import TreeParams
from specmesh.services.runtime.engines import generate_ar, generate_serial
from specmesh.services.runtime.request import Request
from specmesh.services.runtime.errors import InvalidRequest
from specmesh.services.runtime.sampling import SamplingParams, probs_from_logits
from specmesh.services.runtime.verify import children_of, speculative_sampling_accept

from runner_testing import run_rows

pytestmark = pytest.mark.usefixtures("single_thread")

ALPHA = 1e-3
STATS: dict[str, float] = {}  # p-values, printed at the end of the module (pytest -s) for reports


@pytest.fixture(scope="module", autouse=True)
def report_stats() -> Any:
    yield
    for name, value in STATS.items():
        print(f"\n[sampling] {name}: chi-square p = {value:.3g}")


def chi2_pvalue(counts: Counter, exact: dict[tuple[int, ...], float]) -> float:
    """Chi-square goodness of fit of counts against exact probabilities (pooling cells expected < 5)."""
    n = sum(counts.values())
    exact = {k: v for k, v in exact.items() if v > 0}
    assert set(counts) <= set(exact), f"impossible outcomes observed: {set(counts) - set(exact)}"
    keys = sorted(exact)
    probs = np.array([exact[k] for k in keys], dtype=np.float64)
    probs /= probs.sum()
    obs = np.array([counts.get(k, 0) for k in keys], dtype=np.float64)
    big = probs * n >= 5
    f_obs, f_exp = list(obs[big]), list(probs[big] * n)
    if (~big).any():
        f_obs.append(obs[~big].sum())
        f_exp.append(probs[~big].sum() * n)
    assert len(f_obs) >= 2, "too few cells for a meaningful test"
    return float(chisquare(f_obs, f_exp).pvalue)


def exact_joint(hf: Any, prompt: list[int], k: int, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(first k tokens = s) under target-only sampling, by enumeration and the chain rule."""
    vocab = hf.config.vocab_size
    out: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(k):
        prefixes = [s for s, p in out.items() if p > 0]
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + list(s) for s in prefixes])).logits[:, -1].double()
        probs = probs_from_logits(logits, params).double()
        out = {s + (x,): out[s] * float(probs[i, x]) for i, s in enumerate(prefixes) for x in range(vocab)}
    return out


def sample_serial(target: Any, draft: Any, prompt: list[int], k: int, params: SamplingParams, tree: TreeParams,
                  n: int) -> Counter:
    counts: Counter = Counter()
    for i in range(n):
        sp = SamplingParams(params.temperature, params.top_p, params.top_k, seed=i)
        out = sum(generate_serial(target, draft, Request(prompt, k, sp), 32, tree), [])
        assert len(out) == k
        counts[tuple(out)] += 1
    return counts


# -- verifier unit tests ---------------------------------------------------------------------------

def gumbel_children(q: torch.Tensor, k: int, gen: torch.Generator) -> list[int]:
    """k draws without replacement from q, in draw order (what the draft does)."""
    g = -torch.log(-torch.log(torch.rand(q.shape, generator=gen).clamp_(1e-20, 1.0)))
    order = torch.topk(q.log() + g, k).indices.tolist()
    return [x for x in order if q[x] > 0]


CASES = {
    # name: (p, q, children per node)
    "k1": ([0.1, 0.4, 0.2, 0.2, 0.1], [0.5, 0.1, 0.1, 0.2, 0.1], 1),
    "k3": ([0.05, 0.5, 0.3, 0.1, 0.05], [0.6, 0.05, 0.05, 0.1, 0.2], 3),
    "all-tokens": ([0.3, 0.3, 0.2, 0.1, 0.1], [0.1, 0.1, 0.2, 0.3, 0.3], 5),
    "disjoint-support": ([0.0, 0.0, 0.5, 0.5, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0], 2),
    "p-equals-q": ([0.2, 0.3, 0.1, 0.25, 0.15], [0.2, 0.3, 0.1, 0.25, 0.15], 2),
    "q-misses-support": ([0.25, 0.25, 0.25, 0.25, 0.0], [0.0, 0.0, 0.5, 0.3, 0.2], 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_verifier_one_level_outputs_p(case: str) -> None:
    """One node with children drawn by Gumbel-top-k without replacement from q: the emitted token
    (accepted child, else the bonus) is distributed as p exactly."""
    p0, q0, k = CASES[case]
    p, q = torch.tensor([p0]), torch.tensor([q0])
    vocab = p.shape[1]
    gen = torch.Generator().manual_seed(1)
    counts: Counter = Counter()
    n = 20000 if case == "k3" else 5000
    for _ in range(n):
        kids = gumbel_children(q[0], k, gen)
        tokens, parents = [9] + kids, [-1] + [0] * len(kids)
        rows = len(tokens)
        pp = torch.cat([p, torch.full((rows - 1, vocab), 1.0 / vocab)])  # after a child: anything
        qq = torch.cat([q, torch.zeros(rows - 1, vocab)])
        path, bonus = speculative_sampling_accept(pp, qq, tokens, parents, gen)
        assert path[0] == 0 and len(path) <= 2
        counts[(tokens[path[1]] if len(path) == 2 else bonus,)] += 1
    pv = chi2_pvalue(counts, {(x,): float(p0[x]) for x in range(vocab) if p0[x] > 0})
    STATS[f"verifier one level [{case}]"] = pv
    assert pv > ALPHA


def test_verifier_two_levels_outputs_chain_rule() -> None:
    """A two-level tree (2 children per node): the first two tokens of (this round + a fresh target
    sample when only the bonus came out) follow p(x1) p(x2 | x1)."""
    vocab = 4
    rng = np.random.default_rng(3)
    p_root = rng.dirichlet(np.ones(vocab))
    p_next = rng.dirichlet(np.ones(vocab), size=vocab)  # target after token x
    q_root = rng.dirichlet(np.ones(vocab))
    q_next = rng.dirichlet(np.ones(vocab) * 0.5, size=vocab)
    gen = torch.Generator().manual_seed(2)
    counts: Counter = Counter()
    for _ in range(12000):
        tokens, parents = [0], [-1]
        for c in gumbel_children(torch.tensor(q_root, dtype=torch.float32), 2, gen):
            tokens.append(c)
            parents.append(0)
        for node in range(1, len(tokens)):
            for c in gumbel_children(torch.tensor(q_next[tokens[node]], dtype=torch.float32), 2, gen):
                tokens.append(c)
                parents.append(node)
        p = torch.tensor(np.stack([p_root] + [p_next[t] for t in tokens[1:]]), dtype=torch.float32)
        q = torch.tensor(np.stack([q_root] + [q_next[t] for t in tokens[1:]]), dtype=torch.float32)
        for node in range(len(tokens)):
            if not children_of(parents)[node]:
                q[node] = 0.0
        path, bonus = speculative_sampling_accept(p, q, tokens, parents, gen)
        out = [tokens[i] for i in path[1:]] + [bonus]
        if len(out) == 1:
            out.append(int(torch.multinomial(torch.tensor(p_next[out[0]]), 1, generator=gen)))
        counts[tuple(out[:2])] += 1
    exact = {(a, b): float(p_root[a] * p_next[a][b]) for a in range(vocab) for b in range(vocab)}
    pv = chi2_pvalue(counts, exact)
    STATS["verifier two levels"] = pv
    assert pv > ALPHA


def test_probs_from_logits_top_k_top_p() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    full = torch.softmax(logits / 0.5, -1)
    torch.testing.assert_close(probs_from_logits(logits, SamplingParams(temperature=0.5)), full)
    top2 = probs_from_logits(logits, SamplingParams(temperature=0.5, top_k=2))
    torch.testing.assert_close(top2[0, :2], full[0, :2] / full[0, :2].sum())
    assert top2[0, 2:].eq(0).all()
    # top_p keeps the smallest head whose mass reaches top_p
    head = float(full[0, 0])
    just_first = probs_from_logits(logits, SamplingParams(temperature=0.5, top_p=head * 0.999))
    assert just_first[0, 0] == 1.0 and just_first[0, 1:].eq(0).all()
    two = probs_from_logits(logits, SamplingParams(temperature=0.5, top_p=head * 1.001))
    assert two[0, :2].gt(0).all() and two[0, 2:].eq(0).all()
    assert abs(float(two.sum()) - 1.0) < 1e-6


# -- engine-level: serial tree speculation vs exact target-only sampling ----------------------------

ENGINE_CASES = {
    # name: (vocab, k, sampling, tree, samples)
    # The first token comes from the prefill (target-only); trees deep enough to speculate tokens 2 and 3.
    "v8-k2-t1": (8, 2, SamplingParams(temperature=1.0), TreeParams(width=3, subtree_size=6, depth=2), 2500),
    "v5-k3-topk-topp": (5, 3, SamplingParams(temperature=0.8, top_k=4, top_p=0.9),
                        TreeParams(width=3, subtree_size=5, depth=2), 2500),
}


@pytest.fixture(scope="module")
def engine_models(make_hf_model: Any) -> Callable[[int], tuple[Any, Any, Any]]:
    made: dict[int, tuple[Any, Any, Any]] = {}

    def get(vocab: int) -> tuple[Any, Any, Any]:
        if vocab not in made:
            hf, target = make_hf_model("qwen2", seed=11, vocab=vocab, hidden=32, layers=1, lm_head_scale=2.0)
            # A peaked draft that disagrees with the flatter target: lossy verifiers show clearly.
            _, draft = make_hf_model("llama", seed=12, vocab=vocab, hidden=16, layers=1, heads=2, kv_heads=1,
                                     lm_head_scale=10.0)
            made[vocab] = (hf, target, draft)
        return made[vocab]

    return get


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_serial_sampling_matches_target_distribution(engine_models: Any, case: str) -> None:
    vocab, k, params, tree, n = ENGINE_CASES[case]
    hf, target, draft = engine_models(vocab)
    prompt = [1, 3, 2]
    exact = exact_joint(hf, prompt, k, params)
    counts = sample_serial(target, draft, prompt, k, params, tree, n)
    pv = chi2_pvalue(counts, exact)
    STATS[f"serial [{case}]"] = pv
    assert pv > ALPHA


def test_target_only_sampling_matches_target_distribution(engine_models: Any) -> None:
    hf, target, _ = engine_models(8)
    params = SamplingParams(temperature=1.0)
    exact = exact_joint(hf, [1, 3, 2], 2, params)
    counts: Counter = Counter()
    for i in range(2000):
        counts[tuple(sum(generate_ar(target, Request([1, 3, 2], 2, SamplingParams(1.0, seed=i)), 32), []))] += 1
    pv = chi2_pvalue(counts, exact)
    STATS["target-only (generate_ar)"] = pv
    assert pv > ALPHA


def naive_lossy_accept(p: torch.Tensor, q: torch.Tensor, tokens: list[int], parents: list[int],
                       generator: torch.Generator) -> tuple[list[int], int]:
    """A plausible-looking but lossy verifier: at each node, for each child in order, draw x ~ p and
    accept the child if x equals it; with no match the bonus is a fresh sample from p."""
    children = children_of(parents)
    path, node = [0], 0
    while True:
        for child in children[node]:
            if int(torch.multinomial(p[node], 1, generator=generator)) == tokens[child]:
                path.append(child)
                node = child
                break
        else:
            return path, int(torch.multinomial(p[node], 1, generator=generator))


def test_naive_verifier_is_rejected(engine_models: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Meta-test: the same statistic must reject a lossy verifier, or the tests above prove nothing."""
    monkeypatch.setattr(target_session, "speculative_sampling_accept", naive_lossy_accept)
    vocab, k, params, tree, _ = ENGINE_CASES["v8-k2-t1"]
    hf, target, draft = engine_models(vocab)
    exact = exact_joint(hf, [1, 3, 2], k, params)
    counts = sample_serial(target, draft, [1, 3, 2], k, params, tree, 6000)
    pv = chi2_pvalue(counts, exact)
    STATS["serial with the NAIVE verifier (must reject)"] = pv
    assert pv < ALPHA


# -- a crafted pair where the draft's choice of subtree can bias the output -------------------------

def bigram_model(probs: np.ndarray) -> Any:
    """A real Llama (1 layer, attention and MLP outputs zeroed) whose next-token distribution depends
    only on the last token: softmax(log probs[last]). Exact distributions, any shape we need."""
    from specmesh.services.runtime.loader import transformer_from_state_dict
    from transformers import AutoModelForCausalLM, LlamaConfig

    vocab = probs.shape[0]
    hidden = max(8, vocab)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    sd = {k: v.clone() for k, v in AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).state_dict().items()}
    for name, w in sd.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w.zero_()
        elif "norm" in name:
            w.fill_(1.0)
    embed = torch.zeros(vocab, hidden)
    embed[torch.arange(vocab), torch.arange(vocab)] = 1.0  # rms-normed to sqrt(hidden) * one-hot
    sd["model.embed_tokens.weight"] = embed
    head = torch.zeros(vocab, hidden)
    head[:, :vocab] = torch.log(torch.tensor(probs, dtype=torch.float32)).clamp(min=-50.0).T / hidden ** 0.5
    sd["lm_head.weight"] = head
    return transformer_from_state_dict(cfg, sd)


def test_subtree_choice_does_not_bias_sampling() -> None:
    """Whether the draft sends a second child must not depend on that child's own draw.

    Root token 0: target p and draft q below; elsewhere the draft is uniform. With width 2, subtree 3,
    depth 1 the subtree is root, first child, and then either the second child or the first child's
    first child, decided by scores. If a node's score is its own sampled probability, the second
    child is sent only when it is a high-q token, the verifier sees a biased draw, and the first
    token comes out as about (.017 .013 .077 .719 .147 .027) instead of p (L1 error 0.35).
    """
    p0 = np.array([0.035, 0.0126, 0.077, 0.5429, 0.2775, 0.0549])
    q0 = np.array([0.001, 0.7285, 0.1042, 0.1465, 0.0208, 0.001])
    vocab = len(p0)
    p_all, q_all = np.full((vocab, vocab), 1.0 / vocab), np.full((vocab, vocab), 1.0 / vocab)
    p_all[0], q_all[0] = p0 / p0.sum(), q0 / q0.sum()
    # The first token comes from the target's prefill, unspeculated: prompt [1] makes it 0 for sure,
    # so the second token is the one speculated at root token 0.
    p_all[1], q_all[1] = np.eye(vocab)[0], np.eye(vocab)[0]
    target, draft = bigram_model(p_all), bigram_model(q_all)
    got = torch.softmax(run_rows(target, [0], target.new_cache(1), mask=None), -1)
    torch.testing.assert_close(got[0].double(), torch.tensor(p_all[0]), atol=1e-5, rtol=0)  # the construction
    params = SamplingParams(temperature=1.0)
    counts = sample_serial(target, draft, [1], 2, params, TreeParams(width=2, subtree_size=3, depth=1), 1500)
    pv = chi2_pvalue(counts, {(0, x): float(p_all[0, x]) for x in range(vocab)})
    STATS["serial, crafted bigram pair (subtree choice)"] = pv
    assert pv > ALPHA


# -- reproducibility --------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible(engine_models: Any) -> None:
    _, target, draft = engine_models(8)
    tree = TreeParams(width=2, subtree_size=4, depth=2)
    runs = []
    for seed in (5, 5, 6):
        req = Request([1, 3, 2], 12, SamplingParams(temperature=1.0, seed=seed))
        runs.append((sum(generate_serial(target, draft, req, 32, tree), []), sum(generate_ar(target, req, 32), [])))
    assert runs[0] == runs[1]
    outputs = {tuple(r[0]) for r in runs} | {tuple(r[1]) for r in runs}
    assert len(outputs) > 1, "different seeds (and engines) should not all give one sequence"


def test_sampling_params_validation() -> None:
    for bad in (dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
                dict(top_k=-1)):
        with pytest.raises(InvalidRequest):
            SamplingParams(**bad)


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_runs_on_the_models_device(tiny_pair: Any, device: str) -> None:
    """Sampled serial speculation draws with generators on the model's device (torch refuses a CPU
    generator for CUDA tensors), and a seed gives the same tokens twice. The CUDA case runs only
    where a GPU is present."""
    from specmesh.services.runtime.draft_session import DraftSession
    from specmesh.services.runtime.loader import load_transformer

    target = load_transformer(tiny_pair[0], torch.float32, device)
    draft = load_transformer(tiny_pair[1], torch.float32, device)
    sampling = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    tree = TreeParams(width=3, subtree_size=6, depth=2)
    runs = [sum(generate_serial(target, draft, Request([1, 2, 3], 24, sampling), 64, tree), []) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 24
    session = DraftSession(draft.new_cache(64), tree, sampling, draft.vocab_size, draft.device)
    assert session.generator.device.type == torch.device(device).type
