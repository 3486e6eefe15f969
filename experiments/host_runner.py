"""A model runner that does all host-side work of the real one and no model: for host-time benchmarks.

It builds BatchInputs (token ids, positions, slots, block-table rows) and syncs the block table
as the real runner does, then returns a fixed token per sequence, so a step's time is the
scheduler + allocator + accounting + input preparation + output processing.
"""
from __future__ import annotations

import torch

from engine.block_table import PersistentBlockTable
from engine.runner import BatchInputs
from engine.staging import HostStaging
from kernels.metadata import Addressing


class HostOnlyRunner:
    def __init__(self, allocator, max_num_seqs: int, max_model_len: int, token: int = 7):
        self.allocator = allocator
        self.token = token
        self.staging = HostStaging(torch.device("cpu"))
        self.table = None
        if allocator.mode == Addressing.PAGED:
            self.table = PersistentBlockTable(max_num_seqs + 1, -(-max_model_len // allocator.block_size),
                                              torch.device("cpu"))

    def execute(self, batch):
        inputs = BatchInputs(batch, self.allocator, self.table)
        if self.table is not None:
            self.table.sync(self.staging)
        return [(s, self.token, None) for s in inputs.sample_seqs]

    def release(self, seq):
        if self.table is not None:
            self.table.release(seq.seq_id)

    forget = release
