"""A trainer process for the weight-sync tests: pushes perturbed tiny-model weights, optionally dying mid-push.

``python -m tests.runtime.sync_trainer_for_tests ADDRESS MODEL_DIR SEED [--die-after-chunks N]``: with
``--die-after-chunks`` the process SIGKILLs itself after broadcasting N chunks (a trainer crash mid-transfer).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from explorer.weight_sync import protocol
from explorer.weight_sync.trainer import TrainerClient
from tests.runtime.sync_support import perturbed_state


class DyingTrainer(TrainerClient):
    def __init__(self, address: str, die_after: int):
        super().__init__(address)
        self.die_after = die_after

    def _broadcast(self, tensors: list[tuple[str, torch.Tensor]], metas: list[protocol.TensorMeta]) -> None:
        assert self.info is not None
        for sent, indexes in enumerate(protocol.chunks(metas, self.info.bucket_bytes)):
            if sent == self.die_after:
                print(f"dying after {sent} chunks", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            self._group.group.broadcast(protocol.pack([tensors[i][1] for i in indexes]), 0).wait()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("seed", type=int)
    parser.add_argument("--die-after-chunks", type=int, default=None)
    args = parser.parse_args(argv)
    state = perturbed_state(args.model_dir, args.seed)
    client: Any = DyingTrainer(args.address, args.die_after_chunks) if args.die_after_chunks is not None else (
        TrainerClient(args.address))  # fmt: skip
    with client:
        print(client.push(state), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
