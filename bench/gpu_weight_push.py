"""GPU data path of a weight push on one GPU: a 7B-shaped bf16 state dict, trainer process → engine process.

For the device machine (one H200, no vLLM installed there, nothing to download): two processes on one GPU cannot
form an NCCL group (NCCL refuses two ranks on one device), so this measures the colocated path the issue allows —
CUDA IPC. The trainer packs the state dict into 1 GiB buckets (two, reused), shares each through CUDA IPC; the
engine process copies every bucket into a staging area and, after the last one, applies it to its own parameters
(the same all-or-nothing rule as our CPU backends). Printed: seconds and GB/s for the push, next to a device-to-
device copy of the same bytes inside one process (the baseline). Goal: push ≤ 1 s.

Run: ``python3 bench/gpu_weight_push.py`` (torch with CUDA only).
"""

from __future__ import annotations

import time

import torch
import torch.multiprocessing as mp

HIDDEN, INTER, LAYERS, VOCAB, KV = 4096, 11008, 32, 32000, 4096
BUCKET = 1 << 30


def shapes() -> list[tuple[str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)), (p + "self_attn.k_proj.weight", (KV, HIDDEN)),
                (p + "self_attn.v_proj.weight", (KV, HIDDEN)), (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                (p + "mlp.gate_proj.weight", (INTER, HIDDEN)), (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
                (p + "mlp.down_proj.weight", (HIDDEN, INTER)), (p + "input_layernorm.weight", (HIDDEN,)),
                (p + "post_attention_layernorm.weight", (HIDDEN,))]  # fmt: skip
    return [*out, ("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def plan(sizes: list[int]) -> list[list[int]]:
    """vLLM's rule: flush after the running total exceeds the bucket."""
    chunks, current, total = [], [], 0
    for i, size in enumerate(sizes):
        current.append(i)
        total += size
        if total > BUCKET:
            chunks.append(current)
            current, total = [], 0
    return [*chunks, current] if current else chunks


def engine(queue: mp.Queue, done: mp.Queue) -> None:  # type: ignore[type-arg]
    params = {n: torch.empty(s, dtype=torch.bfloat16, device="cuda") for n, s in shapes()}
    done.put("ready")
    for _ in range(3):
        staged: list[tuple[list[str], torch.Tensor]] = []
        while True:
            item = queue.get()
            if item is None:
                break
            names, shared = item
            staged.append((names, shared.clone()))  # the producer reuses its buffer: copy before acknowledging
            torch.cuda.current_stream().synchronize()
            done.put("chunk")
        torch.cuda.synchronize()
        for names, buffer in staged:  # apply only after the whole state dict arrived
            offset = 0
            for name in names:
                target = params[name]
                target.view(-1).copy_(buffer[offset : offset + target.numel() * 2].view(torch.bfloat16))
                offset += target.numel() * 2
        torch.cuda.synchronize()
        done.put("applied")


def main() -> None:
    mp.set_start_method("spawn")
    state = [(n, torch.randn(s, dtype=torch.bfloat16, device="cuda")) for n, s in shapes()]
    nbytes = sum(t.numel() * 2 for _, t in state)
    print(f"state dict: {len(state)} tensors, {nbytes / 1e9:.2f} GB bf16 (7B-shaped)")
    flat = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    offset = 0
    for _, t in state:
        flat[offset : offset + t.numel() * 2].copy_(t.view(-1).view(torch.uint8))
        offset += t.numel() * 2
    torch.cuda.synchronize()
    base = time.perf_counter() - started
    print(f"baseline: one in-process device copy of all bytes: {base:.3f} s ({nbytes / base / 1e9:.0f} GB/s)")
    del flat

    queue: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    done: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    proc = mp.Process(target=engine, args=(queue, done))
    proc.start()
    assert done.get(timeout=300) == "ready"
    buffers = [torch.empty(BUCKET + (512 << 20), dtype=torch.uint8, device="cuda") for _ in range(2)]
    chunks = plan([t.numel() * 2 for _, t in state])
    for attempt in range(3):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for k, indexes in enumerate(chunks):
            buffer = buffers[k % 2]
            if k >= 2:
                assert done.get(timeout=60) == "chunk"  # the engine copied the chunk that used this buffer
            offset = 0
            for i in indexes:
                t = state[i][1]
                buffer[offset : offset + t.numel() * 2].copy_(t.view(-1).view(torch.uint8))
                offset += t.numel() * 2
            torch.cuda.synchronize()
            queue.put(([state[i][0] for i in indexes], buffer[:offset]))
        queue.put(None)
        while (message := done.get(timeout=120)) != "applied":
            assert message == "chunk"
        seconds = time.perf_counter() - started
        print(f"push {attempt + 1}: {seconds:.3f} s ({nbytes / seconds / 1e9:.0f} GB/s) in {len(chunks)} chunks; "
              f"goal <= 1 s: {'met' if seconds <= 1 else 'NOT met'}")  # fmt: skip
    proc.join(timeout=60)


if __name__ == "__main__":
    main()
