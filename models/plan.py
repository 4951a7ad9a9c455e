# How a model can be split, by module names, kept beside each family (as torchtitan keeps a parallelize plan
# beside each model): its repeated blocks, and inside a block the projections that split column-wise (output
# features over the tensor-parallel ranks: q, k, v, gate, up) and row-wise (input features; the partial outputs
# summed: o, down), the norms that sequence parallelism shards, the embedding and the output head. Strategies
# turn the names into torch's parallel styles: models/ never imports torch.distributed.
import operator
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ParallelPlan:
    blocks: str  # the ModuleList of repeated blocks, as a dotted path from the model
    colwise: tuple[str, ...] = ()  # in a block
    rowwise: tuple[str, ...] = ()  # in a block
    norms: tuple[str, ...] = ()  # in a block
    embedding: str | None = None
    final_norm: str | None = None
    head: str | None = None
    # in a block: the modules that read the whole sequence, and how many positional inputs each takes (the
    # first is the residual stream): sequence parallelism gathers it on the way in
    sp_inputs: tuple[tuple[str, int], ...] = ()
    unsplit: str | None = None  # why tensor parallelism cannot split this model, in one line (None: it can)
    # Pipeline stages: the modules the first stage holds before the blocks and the last stage after them (dotted
    # paths), and the model's forward_stage(x, blocks, embed, head, seq_len) runs one stage
    first_stage: tuple[str, ...] = ()
    last_stage: tuple[str, ...] = ()
    unpiped: str | None = None  # why pipeline parallelism cannot split this model into stages (None: it can)

    def block_list(self, model: nn.Module) -> nn.ModuleList | nn.ModuleDict:
        # A ModuleDict keyed by the blocks' indices on a pipeline rank, which holds only its stages' blocks.
        return operator.attrgetter(self.blocks)(model)

    def indexed_blocks(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        # (index in the whole model, block) for the blocks this rank holds.
        layers = self.block_list(model)
        if isinstance(layers, nn.ModuleDict):
            return [(int(k), b) for k, b in layers.items()]
        return list(enumerate(layers))
