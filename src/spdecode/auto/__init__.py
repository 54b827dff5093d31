"""`--method auto` and `spdecode tune`: the fastest lossless configuration for the machine at hand.

- profile.py: the machine profile (what `tune` measured), its key, and when it is stale;
- tune.py: the measurement (a one-Linear probe prunes the backends, then cost-file timings);
- candidates.py: the grid of configurations auto chooses from and their simulated speeds;
- confirm.py: paired, interleaved short runs of the best few, and the rule that leaves AR;
- choose.py: the whole decision, cached in the profile, and the line that explains it.
"""
