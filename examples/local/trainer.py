"""A reference trainer beside an ExplorerJob: it knows only the job's ``status.sync.address``, its token and the model.

Each round it reads a batch of experiences from the job's stream (``--batch`` of them, acknowledged once used),
makes a toy update of the tiny model's weights (a seeded redraw, so anyone can recompute exactly what was pushed) and
pushes it to every engine of the job through ``TrainerClient``; after the last push it reads what the explorer
still produces until the stream is finished. One JSON line per read and per push. A real trainer replaces
``toy_update`` with its optimizer step on the batch. Run it in a pod labelled ``explorer.rft.dev/trainer-for=<job>``
(the job's NetworkPolicy admits only such pods to the sync port), with ``EXPLORER_SYNC_TOKEN`` set from key
``trainer-token`` of the job's Secret ``<job>-credentials`` (every sync route refuses a caller without it)::

    EXPLORER_SYNC_TOKEN="$(kubectl get secret cpu-tiny-credentials -o jsonpath='{.data.trainer-token}' | base64 -d)" \
    python3 trainer.py --address "$(kubectl get ej cpu-tiny -o jsonpath='{.status.sync.address}')" \\
        --model /models/tiny --pushes 1 --batch 16 --seed 7
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from explorer.experience_wire import ExperienceBatch
from explorer.weight_sync.trainer import ExperiencesExhaustedError, TrainerClient


def toy_update(model_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    """The tiny model's tensors redrawn from N(0, 0.2) with ``seed``: visibly different outputs, reproducible."""
    original = load_file(str(model_dir / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(t.shape, generator=generator) * 0.2 for name, t in sorted(original.items())}


def read(client: TrainerClient, size: int, timeout: float) -> ExperienceBatch | None:
    """The next ``size`` experiences (fewer once the explorer is done), acknowledged; None when none remain."""
    try:
        batch = client.experiences(size, timeout=timeout)
    except ExperiencesExhaustedError:
        return None
    client.ack(batch)
    ids = [[e.batch_id, e.task_id, e.run_id] for e in batch.experiences]
    versions = sorted({e.policy_version for e in batch.experiences}, key=lambda v: -1 if v is None else v)
    print(json.dumps({"read": len(ids), "ids": ids, "versions": versions, "finished": batch.finished}), flush=True)
    return batch


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the job's status.sync.address")
    parser.add_argument("--model", type=Path, required=True, help="directory with model.safetensors")
    parser.add_argument("--pushes", type=int, default=1)
    parser.add_argument("--batch", type=int, default=0, help="experiences read before each push (0: push only)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for a batch")
    parser.add_argument("--seed", type=int, default=7, help="push i uses seed + i")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between pushes")
    args = parser.parse_args(argv)
    with TrainerClient(args.address) as client:
        for i in range(args.pushes):
            if args.batch:
                read(client, args.batch, args.timeout)
            result = client.push(toy_update(args.model, args.seed + i))
            print(json.dumps({"push": i, "seed": args.seed + i, "version": result.version,
                              "engines_in_sync": result.engines_in_sync, "engines": result.engines,
                              "seconds": round(result.seconds, 3)}), flush=True)  # fmt: skip
            time.sleep(args.interval)
        while args.batch and (batch := read(client, args.batch, args.timeout)) is not None and not batch.finished:
            pass  # the steps explored on the last push's weights
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
