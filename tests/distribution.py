"""Distribution test helpers: exact AR probabilities of short continuations, and a relative threshold.

The threshold is relative (as vLLM's rejection-sampler tests): a method's total-variation distance
to the exact distribution is compared with the distance of as many draws from the exact
distribution itself, so the test does not depend on a hand-tuned absolute bound.
"""

import torch

from spdecode.runtime.sampling import Sampler, SamplingParams

PARAMS = dict(temperature=0.9, top_k=4, top_p=1.0)


def exact_distribution(model, prompt, length, params):
    """AR's probability of every continuation of `length` tokens (warped as the sampler does)."""
    sampler = Sampler(params)
    probs = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for seq, p in probs.items():
            with torch.no_grad():
                dist = sampler.probs(model(torch.tensor([prompt + list(seq)])).logits[0, -1].float())
            for tok in torch.nonzero(dist).flatten().tolist():
                nxt[seq + (tok,)] = p * float(dist[tok])
        probs = nxt
    return probs


def total_variation(counts, exact, n):
    keys = set(counts) | set(exact)
    return 0.5 * sum(abs(counts.get(k, 0) / n - exact.get(k, 0.0)) for k in keys)


def sampled_vs_exact(model, prompt, length, samples, run, params=PARAMS):
    """(TV of `run(SamplingParams)` samples to the exact distribution, median TV of exact samples)."""
    exact = exact_distribution(model, prompt, length, SamplingParams(**params))
    counts = {}
    for seed in range(samples):
        seq = tuple(run(SamplingParams(**params, seed=seed)))
        counts[seq] = counts.get(seq, 0) + 1
    keys = list(exact)
    weights = torch.tensor([exact[k] for k in keys])
    g = torch.Generator().manual_seed(0)
    noise = []
    for _ in range(21):
        ref_counts = {}
        for i in torch.multinomial(weights, samples, replacement=True, generator=g).tolist():
            ref_counts[keys[i]] = ref_counts.get(keys[i], 0) + 1
        noise.append(total_variation(ref_counts, exact, samples))
    return total_variation(counts, exact, samples), sorted(noise)[len(noise) // 2]
