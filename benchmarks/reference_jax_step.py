#!/usr/bin/env python
"""Time one training step of the reference JAX implementation's LRU (camail-official/compressm) on CPU.

This runs in a separate Python environment with JAX (``pip install jax jaxlib equinox optax``), never in this
package's environment, and imports the reference code from a checkout given on the command line (the reference
code is not part of this repository)::

    OMP_NUM_THREADS=1 XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        /path/to/jax-venv/bin/python benchmarks/reference_jax_step.py --reference /path/to/compressm-checkout

The step is the reference's own ``make_step`` (jitted forward, backward and AdamW update, batch statistics norm,
dropout) on its ``LRU`` model at the sMNIST shape of the paper (1 block, H=8, N=256, L=784, batch 50, 10
classes, continuous input of width 1) by default. It prints one JSON line with the per-step times (after warm-up
and compilation) and their median; ``benchmarks/bench_cpu_step.py --reference-json`` records it beside our figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types


def _import_reference(checkout: str):
    """Import the reference's model and training utilities without running its package ``__init__`` files (which
    pull in its dataset loaders and their torchvision dependency)."""
    package_dir = os.path.join(os.path.abspath(checkout), "compressm")
    if not os.path.isdir(package_dir):
        raise SystemExit(f"no compressm/ package in {checkout!r}: pass the reference checkout with --reference")
    for name, folder in (("compressm", package_dir), ("compressm.training", os.path.join(package_dir, "training"))):
        stub = types.ModuleType(name)
        stub.__path__ = [folder]
        sys.modules[name] = stub
    from compressm.models.lru import LRU  # noqa: E402
    from compressm.training import utils  # noqa: E402

    return LRU, utils


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="checkout of camail-official/compressm")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--length", type=int, default=784)
    ap.add_argument("--hidden", type=int, default=8)
    ap.add_argument("--state", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    LRU, utils = _import_reference(args.reference)
    key = jr.PRNGKey(0)
    model_key, data_key, step_key = jr.split(key, 3)
    model = LRU(num_blocks=args.blocks, input_dim=1, state_dim=args.state, hidden_dim=args.hidden, output_dim=10,
                classification=True, r_min=0.9, r_max=0.999, drop_rate=0.1, key=model_key)
    state = eqx.nn.State(model)
    opt = utils.create_optimizer(lr=4e-4, num_steps=200000, weight_decay=0.0, ssm_lr_factor=1.0,
                                 use_warmup_cosine=False)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    filter_spec = jax.tree_util.tree_map(lambda _: True, model)
    X = jr.normal(data_key, (args.batch, args.length, 1))
    y = jax.nn.one_hot(jnp.arange(args.batch) % 10, 10)

    def step(model, state, opt_state, k):
        model, state, opt_state, loss = utils.make_step(model, filter_spec, X, y, utils.classification_loss, state,
                                                        opt, opt_state, k)
        jax.block_until_ready(loss)
        return model, state, opt_state

    times = []
    for i in range(args.warmup + args.repeats):
        step_key, k = jr.split(step_key)
        t0 = time.perf_counter()
        model, state, opt_state = step(model, state, opt_state, k)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    print(json.dumps(dict(
        implementation="reference JAX (camail-official/compressm make_step)",
        jax=jax.__version__, equinox=eqx.__version__, platform=platform.processor() or platform.machine(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"), xla_flags=os.environ.get("XLA_FLAGS"),
        batch=args.batch, length=args.length, hidden=args.hidden, state=args.state, blocks=args.blocks,
        step_ms=[round(1e3 * t, 1) for t in times], median_ms=round(1e3 * statistics.median(times), 1),
    )))


if __name__ == "__main__":
    main()
