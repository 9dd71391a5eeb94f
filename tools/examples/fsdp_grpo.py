"""A few GRPO steps of a small model on several ranks with FSDP2 (or DDP) and hbmplan.

    torchrun --standalone --nproc-per-node 2 tools/examples/fsdp_grpo.py            # CPU: gloo
    torchrun --standalone --nproc-per-node 8 tools/examples/fsdp_grpo.py --model qwen3-0.6b
    make demo-dist

Unchanged on GPUs (NCCL, one GPU per rank). Each rank samples its own groups (a stand-in for
the sampler: random token ids and rewards, seeded by step and rank), trains them with
``mem.step`` exactly as on one GPU, and the optimizer steps on the averaged gradients. At the
end every rank checks that all ranks hold the same parameters.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import hbmplan
from hbmplan.losses import PolicyLoss, group_advantages


def build_model(name: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    if name == "reference":
        from hbmplan.models import DecoderConfig, ReferenceDecoder

        cfg = DecoderConfig(vocab_size=512, hidden_size=64, num_layers=4, num_heads=4,
                            num_kv_heads=2, intermediate_size=128, max_positions=1024)  # fmt: skip
        return ReferenceDecoder(cfg).to(device)
    import transformers

    if name == "tiny-qwen3":  # Qwen3's architecture at toy size: no download
        cfg = transformers.Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=4, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=1024)  # fmt: skip
        return transformers.Qwen3ForCausalLM(cfg).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device)


def wrap(model: torch.nn.Module, engine: str, device: torch.device) -> torch.nn.Module:
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layers = model.layers if hasattr(model, "layers") else model.model.layers
    for layer in layers:  # each decoder layer, then the root
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def rollout(step: int, rank: int, vocab: int, groups: int, G: int, device) -> list[hbmplan.Group]:
    """Stands in for the sampler: this rank's groups of this step (sizes differ by rank)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    out = []
    for _ in range(groups + rank % 2):  # unequal work per rank, as in real rollouts
        prompt = torch.randint(0, vocab, (int(torch.randint(48, 128, (1,), generator=g)),),
                               generator=g)  # fmt: skip
        lens = torch.randint(1, 32, (G,), generator=g).tolist()
        responses = [torch.randint(0, vocab, (s,), generator=g).to(device) for s in lens]
        rewards = torch.rand(G, generator=g)
        out.append(hbmplan.Group(prompt.to(device), responses,
                                 data={"advantages": group_advantages(rewards).to(device)}))  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-qwen3", help="reference, tiny-qwen3, or a hub id/path")
    ap.add_argument("--engine", choices=["fsdp", "ddp"], default="fsdp")
    ap.add_argument("--grad-sync", choices=["phase-c", "every-microbatch"], default="phase-c")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--groups", type=int, default=2, help="groups per rank per step")
    ap.add_argument("--G", type=int, default=4, help="responses per prompt")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    )
    if cuda:
        torch.cuda.set_device(device)
    model = build_model(args.model, device)
    model.train()
    vocab = model.config.vocab_size if hasattr(model, "config") else model.cfg.vocab_size
    wrapped = wrap(model, args.engine, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28)
    grad_sync = args.grad_sync if args.engine == "fsdp" else "phase-c"
    with hbmplan.memory(wrapped, tokens_per_microbatch=128, grad_sync=grad_sync) as mem:
        for step in range(args.steps):
            groups = rollout(step, rank, vocab, args.groups, args.G, device)
            t0 = time.perf_counter()
            stats = mem.step(groups, loss_fn)  # the same call as on one GPU
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            if rank == 0:
                print(f"step {step}: rank 0 loss {float(stats.loss):.4f}, {len(groups)} groups "
                      f"here, slowest rank {seconds.item():.2f} s")  # fmt: skip
    if rank == 0:
        print(mem.report())
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    checksum = torch.stack([t.detach().double().sum() for t in full]).sum().reshape(1).cpu()
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    if rank == 0:
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        print(f"{args.engine}, {world} ranks ({'nccl' if cuda else 'gloo'}): parameters "
              f"identical on every rank: {same}")  # fmt: skip
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
