"""Recovery under ``torchrun``: every process recovers on its own shard of the data, the model is
wrapped in DistributedDataParallel (gloo on CPU, NCCL on GPU), rank 0 writes the checkpoint, and a
run started again with the same command resumes from it.

    torchrun --standalone --nproc_per_node=2 examples/torchrun_recover.py [CHECKPOINT_DIR [STEPS]]
"""

from __future__ import annotations

import sys

import timm
import torch
import torch.distributed as dist

import normswap


def main(checkpoint_dir: str = "recover-checkpoints", steps: int = 4, size: int = 32) -> None:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same original on every rank
    original = timm.create_model("resnet18", num_classes=10).eval()
    converted = normswap.convert(original, "small-batch", torch.randn(2, 3, size, size), validate=False).model
    shard = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(rank))  # this rank's data
    result = normswap.recover(original, converted, shard, steps=steps, batch_size=4, checkpoint_dir=checkpoint_dir,
                              checkpoint_every=2, progress=False)
    weights = torch.cat([p.detach().reshape(-1) for p in converted.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(world)]
    dist.all_gather(gathered, weights)
    if rank == 0:
        same = all(torch.equal(gathered[0], w) for w in gathered)
        done = f"loss {result.final_loss:.4g}" if result.steps > result.resumed_from else "nothing left to do"
        print(f"{world} processes, steps {result.resumed_from}→{result.steps} ({done}), "
              f"same weights on every rank: {same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:2], *(int(a) for a in sys.argv[2:3]))
