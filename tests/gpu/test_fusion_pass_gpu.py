"""The fusion pass on GPUs: a tensor-parallel block (row-parallel projection, in-place
dist.all_reduce, residual add, RMSNorm) compiled with mixcc.compile_model runs the fused
backend in place of the allreduce and its epilogue, under Inductor's default mode and
"reduce-overhead" (CUDA graphs), and matches eager within bf16 rounding: on two GPUs
(NCCL beside it) and on two ranks sharing one GPU under MPS (gloo; the eager reference
then runs on the CPU). A transformers Llama made tensor-parallel by parallelize_module
runs on two GPUs with all its allreduces replaced."""

from __future__ import annotations

import pytest
import torch


def _block(hidden: int, group, device, dtype):
    import torch.distributed as dist

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(3)
            self.w1 = torch.nn.Parameter(torch.randn(hidden, hidden, generator=g) / hidden)
            self.norm = torch.nn.RMSNorm(hidden, eps=1e-6)
            with torch.no_grad():
                self.norm.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=g))

        def forward(self, x, residual):
            y = x @ self.w1
            dist.all_reduce(y, group=group)
            h = y + residual
            return self.norm(h), h

    return Block().to(device=device, dtype=dtype)


BLOCK_PROGRAM = "allreduce(tp); add(residual); store(resid_out); rmsnorm(weight, eps=1e-06)"


def fused_block_task(rank: int, world: int) -> None:
    import mixcc

    dev = torch.device("cuda", torch.cuda.current_device())
    shared = not torch.distributed.get_backend().lower().count("nccl")
    mesh = mixcc.Mesh({"tp": world})
    model = _block(1024, None, dev, torch.bfloat16)
    ref_model = _block(1024, None, "cpu", torch.float32) if shared else model
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        compiled = mixcc.compile_model(model, mesh, mode=mode)
        fp = compiled.mixcc_fusion
        for step, rows in enumerate((8, 8, 8, 32)):  # graph replays, then a new shape
            g = torch.Generator().manual_seed(100 * rank + step)
            x = torch.randn(rows, 1024, generator=g)
            r = torch.randn(rows, 1024, generator=g)
            with torch.no_grad():
                if shared:  # gloo: the eager reference on the CPU, in fp32
                    want = ref_model(x.bfloat16().float(), r.bfloat16().float())
                else:
                    want = model(x.to(dev, torch.bfloat16), r.to(dev, torch.bfloat16))
                got = compiled(x.to(dev, torch.bfloat16), r.to(dev, torch.bfloat16))
                got = [t.float().cpu() for t in got]  # before the next replay reuses them
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b.float().cpu(), atol=3e-2, rtol=3e-2,
                                           msg=lambda m, mode=mode, rows=rows:
                                           f"rank {rank} {mode} rows {rows}: {m}")
        # one allreduce a graph (rows 8, then rows 32 recompiled), each replaced with its
        # whole epilogue: h is returned, so the sum is stored
        assert fp.graphs >= 1 and len(fp.sites) == fp.graphs, fp.report()
        assert sum(s.replaced for s in fp.sites) == fp.graphs, fp.report()
        assert {s.program for s in fp.sites} == {BLOCK_PROGRAM}, fp.report()
    torch.cuda.synchronize()
    mixcc.fusion.clear_compiled()


@pytest.mark.parametrize("gpus", [2, 1], ids=["two_gpus", "one_gpu_mps"])
def test_fused_block_matches_eager(spawn_ranks, gpus):
    spawn_ranks(fused_block_task, 2, gpus=gpus)


def llama_gpu_task(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
    from transformers import LlamaConfig, LlamaForCausalLM

    import mixcc

    dm = init_device_mesh("cuda", (1, world), mesh_dim_names=("dp", "tp"))
    cfg = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1024,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=256)
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
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        compiled = mixcc.compile_model(model, dm, mode=mode)
        ids = torch.randint(0, cfg.vocab_size, (2, 16), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(1))
        with torch.no_grad():
            want = model(ids).logits.float()
            got = compiled(ids).logits.float().clone()
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
        fp = compiled.mixcc_fusion
        assert sum(s.replaced for s in fp.sites) == 2 * cfg.num_hidden_layers, fp.report()
    torch.cuda.synchronize()
    mixcc.fusion.clear_compiled()


def test_llama_tensor_parallel_on_two_gpus(spawn_ranks):
    pytest.importorskip("transformers")
    spawn_ranks(llama_gpu_task, 2, gpus=2)
