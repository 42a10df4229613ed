"""Decode and prefill steps of a tensor-parallel transformers Llama, compiled with and
without mixcc's fusion pass (NCCL underneath both): median step time per token count.

    torchrun --nproc-per-node 2 benchmarks/fusion_llama.py --out fusion_llama

Ranks sharing a GPU (more ranks than GPUs) run on gloo under MPS: a proxy for comparing
the two compiled models with each other, never an NVLink time. The model has random
weights (LlamaConfig from the flags); `--mode reduce-overhead` (the default) replays each
step as a CUDA graph. Prints one row per (phase, tokens) and writes PREFIX.csv and
PREFIX.json when --out is given.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics

import torch
import torch.distributed as dist


def build(args, dm):
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=max(args.prefill) + 64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().to("cuda", torch.bfloat16)
    plan = {}
    for i in range(cfg.num_hidden_layers):
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{n}"] = ColwiseParallel()
        for n in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{n}"] = RowwiseParallel()
    parallelize_module(model, dm["tp"], plan)
    return model, cfg


def time_step(fn, ids, warmup: int, iters: int, repeats: int) -> float:
    """Median over `repeats` of the mean time of `iters` calls, in microseconds."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(ids)
        torch.cuda.synchronize()
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            start.record()
            for _ in range(iters):
                fn(ids)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--decode", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--prefill", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--mode", default="reduce-overhead")
    p.add_argument("--backend", default="auto", help="mixcc backend for the fused sites")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="write PREFIX.csv and PREFIX.json")
    args = p.parse_args()

    from torch.distributed.device_mesh import init_device_mesh

    import mixcc

    local = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count()
    torch.cuda.set_device(local % gpus)
    shared = world > gpus
    dist.init_process_group("gloo" if shared else "nccl")
    dm = init_device_mesh("cuda", (1, world), mesh_dim_names=("dp", "tp"))
    model, cfg = build(args, dm)
    rows = []
    for phase, sizes in (("decode", args.decode), ("prefill", args.prefill)):
        for tokens in sizes:
            ids = torch.randint(0, cfg.vocab_size, (1, tokens), device="cuda",
                                generator=torch.Generator("cuda").manual_seed(tokens))
            row = {"phase": phase, "tokens": tokens}
            for name in ("torch.compile", "torch.compile + mixcc"):
                torch._dynamo.reset()
                if name == "torch.compile":
                    fn = torch.compile(model, mode=args.mode)
                else:
                    fn = mixcc.compile_model(model, dm, mode=args.mode,
                                             fusion={"backend": args.backend})
                us = torch.tensor(time_step(fn, ids, args.warmup, args.iters, args.repeats),
                                  device="cuda")
                dist.all_reduce(us, op=dist.ReduceOp.MAX)  # the slowest rank's time
                row[name] = round(us.item(), 2)
                if name != "torch.compile":
                    fp = fn.mixcc_fusion
                    row["sites"] = len(fp.sites) // max(fp.graphs, 1)
                    row["replaced"] = sum(s.replaced for s in fp.sites) // max(fp.graphs, 1)
            row["speedup"] = round(row["torch.compile"] / row["torch.compile + mixcc"], 3)
            rows.append(row)
            if dist.get_rank() == 0:
                print(f"{phase:8s} {tokens:5d} tokens  torch.compile {row['torch.compile']:9.1f} us"
                      f"  + mixcc {row['torch.compile + mixcc']:9.1f} us  x{row['speedup']:.2f}"
                      f"  ({row['replaced']}/{row['sites']} sites)", flush=True)
    if dist.get_rank() == 0 and args.out:
        env = {"world": world, "gpus": gpus, "shared_gpu_mps": shared,
               "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "args": vars(args)}
        with open(args.out + ".json", "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
        with open(args.out + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    mixcc.fusion.clear_compiled()
    mixcc.close_all()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
