"""The `spdecode` command line's arguments."""

from __future__ import annotations

import argparse

from ..runtime.models import DEFAULT_MODEL
from .commands import (
    cmd_bench,
    cmd_data_clean,
    cmd_data_synth,
    cmd_eval,
    cmd_generate,
    cmd_plan,
    cmd_plot_trace,
    cmd_prepare,
    cmd_regenerate,
    cmd_serve,
    cmd_train,
    cmd_tune,
    cmd_vocab,
)
from .options import (
    DATA_HELP,
    add_backend_arg,
    add_chain_args,
    add_distributed_args,
    add_model_args,
    add_sampling_args,
    add_sd_args,
    stage_spec,
)

DESCRIPTION = "The `spdecode` command line: generate, serve, bench, train, data, plan, ..."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spdecode", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a continuation, streamed to the terminal")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    g.add_argument("--method", default="auto", choices=["auto", "ar", "spd", "sd", "eagle", "speed", "pipespec"],
                   help="auto (default): the fastest lossless configuration measured on this machine (method, "
                        "backend unless --backend is given, threads, stages, tree; `spdecode tune`); "
                        "ar: autoregressive; spd: speculative pipeline decoding; sd: classic speculative "
                        "decoding; eagle: a trained head on the target's features drafting a dynamic tree; "
                        "speed: SPD's pipeline with SPEED's early-exit drafter; pipespec: a chain of "
                        "model processes (--chain)")
    g.add_argument("--draft", default=None,
                   help="trained draft: a PDM for --method spd, a head for eagle (default: the bundled one)")
    add_sd_args(g)
    add_chain_args(g)
    g.add_argument("--stages", type=stage_spec, default=1,
                   help="pipeline stages: a count or comma-separated layer counts (default 1)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--trace", default=None, metavar="FILE.json",
                   help="write a timeline of the run (every rank's phases, verdicts) as a Chrome/Perfetto trace")
    add_distributed_args(g)
    g.set_defaults(func=cmd_generate, dtype=None)  # no --backend: float32, or auto's choice under --method auto

    t = sub.add_parser("train", help="train a Pipeline Draft Module for a model and a number of stages")
    add_model_args(t)
    t.add_argument("--stages", type=stage_spec, default=4, help="pipeline stages the draft is for (default 4)")
    t.add_argument("--layers", type=int, default=1, help="PDM decoder layers Ls (default 1)")
    t.add_argument("--anchors", default=None, help="hidden-state indices, e.g. 0,8,16,23,30 (default: stage ends)")
    t.add_argument("--draft-vocab", default="8192",
                   help="size of the draft vocabulary built from the data, 0 for the full one, or a JSON file")
    t.add_argument("--data", default="sharegpt", help="sharegpt (PyPI package), a .jsonl/.json/.parquet, or hub id")
    t.add_argument("--limit", type=int, default=2000, help="conversations to use (default 2000)")
    t.add_argument("--regenerate", action="store_true",
                   help="replace the answers by the target's own greedy answers to the first user turn")
    t.add_argument("--regen-dtype", default="bfloat16", help="dtype used to regenerate answers (default bfloat16)")
    t.add_argument("--regen-batch", type=int, default=32, help="prompts per generate call when regenerating")
    t.add_argument("--max-len", type=int, default=512, help="tokens per training sequence (default 512)")
    t.add_argument("--val-frac", type=float, default=0.02)
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--batch-tokens", type=int, default=4096)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--val-every", type=int, default=100)
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--cache-dir", default=None, help="keep teacher features here across runs (default: memory only)")
    t.add_argument("--out", required=True, help="checkpoint directory (a usable --draft)")
    t.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    t.add_argument("--micro-batch", type=int, default=1,
                   help="sequences per forward pass, right-padded (default 1; e.g. 64 on a GPU)")
    t.add_argument("--teacher-batch", type=int, default=1,
                   help="sequences per batched teacher pass when features stay in memory (default 1)")
    t.add_argument("--time-limit", type=float, default=0.0,
                   help="stop training after this many seconds with a resumable checkpoint; a resumed run counts "
                        "its earlier time, and the learning rate's decay continues (default: none)")
    t.add_argument("--eagle", default="", choices=["", "embed", "feedback"],
                   help="train an EAGLE-style head for --method eagle (one stage) whose drafted tokens are "
                        "embedding-only rows (embed) or carry the head's own output (feedback)")
    t.add_argument("--chain-depth", type=int, default=4,
                   help="--eagle: the deepest draft trained; --tree: the most rows per depth in a window (default 4)")
    t.add_argument("--tree", action="store_true",
                   help="train an SPD draft for --method spd --tree-budget N: windows are paths through draft trees "
                        "in flight (runs of rows per depth, embedding-only rows for nodes grown this cycle)")
    t.add_argument("--init", default=None,
                   help="start from this PDM checkpoint: its anchors, draft vocabulary (--draft-vocab is not used) "
                        "and the weights that match by name and shape")
    t.add_argument("--teacher-dtype", default=None,
                   help="dtype of the frozen target's teacher pass (default: --dtype); bfloat16 is ~2.7x faster on "
                        "a CPU while the draft still trains in --dtype")
    t.add_argument("--topk", type=int, default=0,
                   help="add a top-K distillation term over the teacher's K likeliest draft tokens (HASS); 0: plain KL")
    t.add_argument("--topk-weight", type=float, default=1.0, help="weight of the --topk term (default 1.0)")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("regenerate", help="answer conversations' first user turns with the model itself (greedy)")
    add_model_args(r)
    r.add_argument("--data", default="sharegpt", help="sharegpt (PyPI package), a .jsonl/.json/.parquet, or hub id")
    r.add_argument("--limit", type=int, default=2000, help="conversations to answer (default 2000)")
    r.add_argument("--max-new-tokens", type=int, default=256)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--time-limit", type=float, default=0.0, help="stop starting new batches after this many seconds")
    r.add_argument("--temperature", type=float, default=0.0, help="0: greedy answers (default); > 0: sampled")
    r.add_argument("--top-p", type=float, default=1.0, help="nucleus of sampled answers (default 1.0: off)")
    r.add_argument("--seed", type=int, default=0, help="seed of sampled answers (per batch: a resumed run draws alike)")
    r.add_argument("--out", required=True, help="jsonl of conversations, appended to (an interrupted run resumes)")
    r.set_defaults(func=cmd_regenerate)

    d = sub.add_parser("data", help="training data without a hub: self-synthesized prompts, cleaning")
    dsub = d.add_subparsers(dest="data_command", required=True)
    ds = dsub.add_parser("synth", help="the target writes user prompts itself (Magpie, topic seeds), then answers them")
    add_model_args(ds)
    ds.add_argument("--out", required=True, help="directory: prompts.jsonl and answers.jsonl (a rerun resumes)")
    ds.add_argument("--count", type=int, default=1000, help="prompts to write (default 1000)")
    ds.add_argument("--topics", default="explain,write,math,python", help="topic seeds to draw from (default: all)")
    ds.add_argument("--temperature", type=float, default=1.0, help="of the prompts (default 1.0)")
    ds.add_argument("--top-p", type=float, default=0.95, help="of the prompts (default 0.95)")
    ds.add_argument("--prompt-tokens", type=int, default=160,
                    help="a prompt must end its turn within this many tokens (default 160)")
    ds.add_argument("--answer-temperature", type=float, default=0.0, help="0: greedy answers (default)")
    ds.add_argument("--max-new-tokens", type=int, default=256, help="answer tokens (default 256)")
    ds.add_argument("--batch-size", type=int, default=32)
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--time-limit", type=float, default=0.0, help="seconds for each phase (0: none)")
    ds.set_defaults(func=cmd_data_synth)
    dc = dsub.add_parser("clean", help="drop near-duplicates and anything sharing an n-gram with the evaluation sets")
    dc.add_argument("--data", required=True, help="comma-separated conversation sources (.jsonl, sharegpt, ...)")
    dc.add_argument("--out", required=True, help="jsonl of the conversations kept")
    dc.add_argument("--eval", default="mt_bench,gsm8k,humaneval", help="evaluation sets to keep out (default: all)")
    dc.add_argument("--threshold", type=float, default=0.8, help="near-duplicate Jaccard (default 0.8)")
    dc.add_argument("--ngram", type=int, default=13, help="words of a contaminating n-gram (default 13)")
    dc.set_defaults(func=cmd_data_clean)

    b = sub.add_parser("bench", help="compare decoding methods on prompt sets, side by side in one run")
    add_model_args(b)
    add_sampling_args(b)
    b.set_defaults(max_new_tokens=256)
    b.add_argument("--method", default="ar,spd",
                   help="comma-separated methods (ar, sd, eagle, pipespec, speed, spd), each with its own options "
                        "after colons, e.g. ar,eagle:budget=16:depth=5,spd:stages=2 (default ar,spd)")
    b.add_argument("--ar-sweep", action="store_true",
                   help="run AR in float32 and bfloat16 with 1 and 2 threads; the fastest is the baseline")
    b.add_argument("--plot", default=None, help="write a bar chart of the speedups per dataset (PNG)")
    add_sd_args(b)
    add_chain_args(b)
    b.add_argument("--stages", type=stage_spec, default=4)
    b.add_argument("--draft", default=None, help="PDM checkpoint (default: the bundled draft, if any)")
    b.add_argument("--data", default="mt_bench,gsm8k,humaneval", help=DATA_HELP)
    b.add_argument("--limit", type=int, default=None, help="prompts per set")
    b.add_argument("--json-out", default=None, help="write per-prompt records and the summary here")
    add_distributed_args(b)
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval-draft", help="a draft's exact greedy alpha/tau on prompt sets, by replaying SPD")
    add_model_args(e)
    e.add_argument("--stages", type=stage_spec, default=4)
    e.add_argument("--draft", default=None, help="PDM checkpoint (default: the bundled draft, if any)")
    e.add_argument("--data", default="mt_bench,gsm8k,humaneval", help=DATA_HELP)
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--json-out", default=None)
    e.add_argument("--tree-budget", type=int, default=None,
                   help="draft-tree nodes per slot: > 1 decodes SPD over trees (no exact replay exists for them)")
    e.add_argument("--tree-depth", type=int, default=None)
    e.add_argument("--tree-topk", type=int, default=None)
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("vocab", help="build a draft vocabulary: the most frequent assistant tokens of the data")
    v.add_argument("--model", default=DEFAULT_MODEL)
    v.add_argument("--data", default="sharegpt")
    v.add_argument("--limit", type=int, default=2000)
    v.add_argument("--max-len", type=int, default=512)
    v.add_argument("--size", type=int, default=8192)
    v.add_argument("--out", required=True, help="JSON file to write ({\"token_ids\": [...]})")
    v.set_defaults(func=cmd_vocab)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (streaming, Prometheus /metrics)")
    add_model_args(s)
    s.add_argument("--method", default="auto", choices=["auto", "ar", "spd", "sd", "eagle", "speed", "pipespec"],
                   help="decoding method, as for generate (default auto: the fastest measured here)")
    s.add_argument("--draft", default=None, help="trained draft for spd or eagle (default: the bundled one)")
    add_sd_args(s)
    add_chain_args(s)
    s.add_argument("--stages", type=stage_spec, default=1, help="pipeline stages (default 1)")
    add_distributed_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-queue", type=int, default=32, help="requests that may wait while one decodes (default 32)")
    s.set_defaults(func=cmd_serve, dtype=None)

    pl = sub.add_parser("plan", help="predict which method and split pay off on some hardware, from measured costs")
    pl.add_argument("--measure", action="store_true", help="time layers, head, drafts and the link; write --out")
    pl.add_argument("--costs", default=None, help="cost file (default: the one shipped for --model and --dtype; "
                    "--validate: one timed between its runs)")
    pl.add_argument("--devices", type=int, default=2, help="devices (ranks) available (default 2)")
    pl.add_argument("--alpha", type=float, default=0.45, help="per-draft acceptance to assume (default 0.45)")
    pl.add_argument("--link", default="same-host", help="same-host (measured), pcie, nvlink, 10gbe, 100gbe")
    pl.add_argument("--json-out", default=None)
    pl.add_argument("--plot", default=None, help="PNG of predicted speedup against devices")
    pl.add_argument("--measured", default=None, metavar="VALIDATE.json",
                    help="a plan --validate --json-out file: its measured configurations are marked as such in "
                         "the table and the plot, beside the simulated ones")
    pl.add_argument("--model", default=DEFAULT_MODEL)
    add_backend_arg(pl)
    pl.add_argument("--device", default="cpu")
    pl.add_argument("--threads", default=None,
                    help="thread counts to time (default: 1, powers of two and every usable core)")
    pl.add_argument("--backends", default=None,
                    help="--measure: comma-separated backends to time, one cost file each (all: every backend this "
                         "machine has; default: --backend); with several, --out's {backend} is replaced, or the "
                         "backend is added to its name")
    pl.add_argument("--reps", type=int, default=5, help="timings per point, the median kept (default 5)")
    pl.add_argument("--out", default=None, help="cost file to write (JSON): --measure's, or the one --validate "
                    "times between its runs")
    pl.add_argument("--traces", default=None, help="replay the accept/reject sequences of an eval-draft or bench "
                    "--json-out file instead of --alpha")
    pl.add_argument("--trace", default=None, help="write the best configuration's simulated run as a trace "
                    "(generate --trace's format: plot-trace draws it)")
    pl.add_argument("--validate", action="store_true",
                    help="measure the configurations this machine can run (median of --runs) beside their predictions")
    pl.add_argument("--replay", default=None, metavar="VALIDATE.json",
                    help="--validate: predict a saved validation's measurements again (against --costs, default "
                    "its own cost file) instead of measuring")
    pl.add_argument("--data", default="mt_bench,gsm8k,humaneval", help="--validate: prompt sets or a .jsonl")
    pl.add_argument("--limit", type=int, default=4, help="--validate: prompts per set (default 4)")
    pl.add_argument("--max-new-tokens", type=int, default=128, help="--validate: tokens per prompt (default 128)")
    pl.add_argument("--runs", type=int, default=3, help="--validate: measurements per configuration (default 3)")
    pl.add_argument("--methods", default=None, help="--validate: in-process method specs, bench's syntax "
                    "(default: AR with 1 and 2 threads, sd, eagle, one-process spd at 2 and 4 stages)")
    pl.add_argument("--distributed-methods", default=None, help="--validate: pipeline specs run with one process "
                    "per stage at --stages (default: spd:budget=1,spd; '' for none)")
    pl.add_argument("--stages", type=int, default=2, help="--validate: the pipelines' stages (default 2)")
    pl.add_argument("--master-port", type=int, default=None, help="--validate: rendezvous port (default: a free one)")
    pl.add_argument("--timeout", type=float, default=120.0, help="--validate: seconds a rank waits for a peer")
    pl.add_argument("--steady-wait", type=float, default=90.0,
                    help="--validate: the most seconds to wait, before each part timed and each prompt run, for the "
                    "machine's usual speed (a gauge of several rows; 0: no waits, no retakes)")
    pl.add_argument("--steady-budget", type=float, default=1800.0,
                    help="--validate: the most seconds all those waits take together; past it, each unit is still "
                    "checked and counted, but neither waited for nor taken again (default 1800)")
    pl.set_defaults(func=cmd_plan)

    pt = sub.add_parser("plot-trace", help="draw the first cycles of a --trace file as a per-rank timeline (PNG)")
    pt.add_argument("trace", help="a trace written by generate --trace")
    pt.add_argument("--out", required=True, help="PNG to write")
    pt.add_argument("--cycles", type=int, default=8, help="cycles to show (default 8)")
    pt.set_defaults(func=cmd_plot_trace)

    tu = sub.add_parser("tune", help="measure this machine's profile for --method auto (done once; cached)")
    tu.add_argument("--model", default=DEFAULT_MODEL)
    tu.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    tu.add_argument("--full", action="store_true",
                    help="every backend (no probe), rows 1..17, every thread count of 1, powers of two and all usable "
                         "cores, every bundled draft, a rank beside a busy twin")
    tu.add_argument("--choose", action="store_true", help="then decide what --method auto runs, as generate does")
    tu.set_defaults(func=cmd_tune)

    p = sub.add_parser("prepare", help="convert a model alias to safetensors in the cache (done once)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.set_defaults(func=cmd_prepare)
    return parser
