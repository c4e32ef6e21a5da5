"""Tokens/s of the real language-model training path against a hand-written PyTorch loop.

Ours: `experiment=shakespeare_char` as train.py composes it — TextDataModule, CausalLMModule
(llama), a Lightning Trainer with the experiment's callbacks, TensorBoard logger and precision
(bf16-mixed where bfloat16 is native, else 32-true) — fitted for a fixed number of steps.
Baseline: the same network, AdamW, one-cycle schedule, the same autocast (or none), random
windows of the same text, batch size, block size and steps,
written as a bare loop. Validation is off in both so that only training is timed. Rounds
alternate; the median of the per-round ratios is printed.

    python bench/lm_train_throughput.py [--experiment shakespeare_char] [--steps 100] [--rounds 5]
    python bench/lm_train_throughput.py --only baseline datamodule.batch_size=64 model.net.n_layer=4

Trailing arguments are train.py overrides (a shape, a batch, a precision to compare);
``--only baseline`` times the bare loop alone, the quick way to compare shapes' tokens/s.
"""

from __future__ import annotations

import os

# sleeping OpenMP waits, as the entrypoints set them (src/ml_engine/run/launch.py), before torch
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import compose_train_config, lightning_steps_per_s, quiet_lightning, ratio_line
from hydra.utils import instantiate

from ml_engine.training.lm.module import CausalLMModule


def tokens_per_step(cfg) -> int:
    return cfg.datamodule.batch_size * cfg.datamodule.block_size


def lightning_round(cfg) -> float:
    return lightning_steps_per_s(cfg) * tokens_per_step(cfg)


def baseline_round(cfg) -> float:
    """The loop a careful PyTorch user writes by hand for the same job."""
    torch.manual_seed(0)
    datamodule = instantiate(cfg.datamodule)
    datamodule.setup("fit")
    train_tokens = datamodule.splits[0]
    block, batch_size = cfg.datamodule.block_size, cfg.datamodule.batch_size
    module: CausalLMModule = instantiate(cfg.model)  # only to build the same network
    module.build(datamodule.tokenizer, block)
    net = module.net
    optimizer = instantiate(cfg.model.optimizer)(params=net.parameters())
    steps = cfg.trainer.max_steps
    scheduler = instantiate(cfg.model.scheduler)(optimizer=optimizer, total_steps=steps)
    bf16 = str(cfg.trainer.precision).startswith("bf16")
    offsets = torch.arange(block + 1)

    net.train()
    started = time.perf_counter()
    for _ in range(steps):
        starts = torch.randint(len(train_tokens) - block, (batch_size,))
        windows = train_tokens[starts[:, None] + offsets].long()
        inputs, targets = windows[:, :-1], windows[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return steps * batch_size * block / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="shakespeare_char")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=["both", "baseline", "ours"], default="both")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. model.net.n_layer=4")
    args = parser.parse_args()
    quiet_lightning()

    ours, base = [], []
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"experiment={args.experiment}", *args.overrides]
        cfg = compose_train_config(overrides, args.steps, Path(tmp))
        baseline_round(cfg)  # warm-up: first-call allocations and kernel selection
        for _ in range(args.rounds):
            if args.only != "ours":
                base.append(baseline_round(cfg))
            if args.only != "baseline":
                ours.append(lightning_round(cfg))
    net = cfg.model.net
    print(
        f"{' '.join(overrides)}: {net.n_layer} layers × {net.n_embd} (n_ff {net.n_ff}), batch "
        f"{cfg.datamodule.batch_size} × block {cfg.datamodule.block_size}, {args.steps} steps "
        f"per round, {cfg.trainer.precision}, {torch.get_num_threads()} threads, CPU"
    )
    if args.only == "both":
        print(ratio_line("LM training throughput", ours, base, "tokens/s"))
    else:
        rates = ours or base
        print(
            f"LM training throughput ({args.only}): median {statistics.median(rates):,.1f} "
            f"tokens/s (per round: {', '.join(f'{r:,.0f}' for r in rates)})"
        )


if __name__ == "__main__":
    main()
