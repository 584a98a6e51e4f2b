"""What tensor-parallel ranks 1..N-1 run: a spawned process that holds its shard of the model and its KV heads,
and runs every step rank 0 hands it (engine/executor/tp_group.py is rank 0's side).

Startup speaks over a pipe: "hello" once imported (rank 0 then forms the process group), then ("ready", KV
blocks that fit, memory report) or ("error", traceback); rank 0 answers with the number of KV blocks every rank
allocates. Then the same pipe carries the steps (engine/executor/step_channel.py): run each, until EXIT. The process ends
itself when its parent (rank 0) is gone; an exception in a step ends it with status 1 (rank 0 sees the death and
takes the model down, since the ranks can no longer agree on what was computed).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback

PARENT_POLL_S = 0.5


def _exit_with_parent(parent_pid: int) -> None:
    """A daemon thread that ends this process once its parent is gone (reparented), whatever the main thread is
    blocked in (a collective whose peer died, a wait)."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="bunny-tp-parent-watch", daemon=True).start()


def worker_main(rank: int, size: int, port: int, config_dict: dict, plan, conn, parent_pid: int) -> None:
    _exit_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"bunny tp rank {rank}: %(message)s")
    try:
        runner = _start(rank, size, port, config_dict, plan, conn)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        os._exit(1)
    _serve(runner, conn)


def _start(rank, size, port, config_dict, plan, conn):
    import torch

    from bunny_backend.config import EngineConfig
    from bunny_backend.engine.worker.kv_cache import num_kv_blocks
    from bunny_backend.engine.worker.model_runner import ModelRunner
    from bunny_backend.model.loader import load_model
    from bunny_backend.ops.attention import get_backend
    from bunny_backend.utils.distributed import init_group
    from bunny_backend.utils.memory import ResidentMemory

    config = EngineConfig(**config_dict)
    plan.enter()
    conn.send(("hello",))
    tp = init_group(rank, size, plan.device, port)
    memory = ResidentMemory(plan.device)
    model = load_model(config.model_path, plan.dtype, plan.device, tp)
    plan.quantize(model)
    report = memory.report(model)
    plan.prepare_model(model)
    max_model_len = config.max_model_len or model.config.context_length
    backend = get_backend(plan.attention_backend, min(config.max_num_batched_tokens, max_model_len))
    capacity = num_kv_blocks(config, model.config.text, plan.block_size, max_model_len, plan.dtype, plan.device,
                             backend.workspace_bytes(plan.dtype), model.shards.num_kv_heads)
    conn.send(("ready", capacity, report))
    num_blocks = conn.recv()
    return ModelRunner(model, backend, num_blocks, plan.block_size, plan.device, plan.dtype)


def _serve(runner, conn) -> None:
    import torch

    from bunny_backend.engine.executor import step_channel
    from bunny_backend.utils.distributed import destroy_group

    hidden = runner.model.config.text.hidden_size
    while True:
        try:
            words = step_channel.receive(conn, PARENT_POLL_S)
        except (EOFError, OSError):   # rank 0 is gone
            os._exit(1)
        if words is None:
            continue
        if words[0] == step_channel.EXIT:
            break
        try:
            step, num_images = step_channel.decode(words, runner.device)
            if num_images:
                empty = torch.empty(num_images, hidden, dtype=runner.dtype, device=runner.device)
                step.image_embeds = runner.model.tp.broadcast(empty)
            runner.forward(step)
        except BaseException:
            logging.getLogger().error("a step failed; this rank stops:\n%s", traceback.format_exc())
            os._exit(1)
    destroy_group()
