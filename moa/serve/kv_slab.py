"""The serving engine's KV cache: one preallocated buffer per layer whose rows the running requests reuse.

Every layer's keys and values live in a [rows, kv_heads, columns, head_dim] buffer. The running
requests hold rows 0..n-1 (dense: a leaving request's row is taken by the last one), and every row
writes its next token at the same column `end`; a row's tokens sit right-aligned in the columns just
before it, with no gaps, and `mask` marks them (zero outside them and in free rows). A decode forward attends over the window
[start, end] (start: the first column of the longest row) through views of the buffers, so a step
copies only the new token's keys and values: no concatenation, no reallocation, no re-padding when a
request joins or leaves (what a transformers `DynamicCache` does at every step). When `end` reaches
the allocated columns the window moves back to column 0 (one copy of the window, every many steps);
the columns double, up to `max_columns`, when the window needs more than half of them.

Positions come from each row's own token count, so a row computes what it would compute alone.
Memory: at most rows x max_columns token slots per layer, allocated lazily; `tokens_held` says how
many are allocated now.
"""
from __future__ import annotations

import torch

from moa import compat


class KVSlab:
    def __init__(self, config, max_rows: int, max_columns: int):
        if max_rows < 1 or max_columns < 1:
            raise ValueError(f"a KV slab needs at least one row and one column, got {max_rows} rows x {max_columns} columns")
        self.max_rows, self.max_columns = max_rows, max_columns
        self.keys: list[torch.Tensor] = []  # per layer [max_rows, kv_heads, columns, head_dim]
        self.values: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # [max_rows, columns]: 1 where a row holds a token
        self.n = 0  # rows in use
        self.start = self.end = 0  # the window's first column; the column the next token writes
        self.cache = compat.slab_kv_cache(config, self)  # what the model's forward is given

    @property
    def columns(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def tokens_held(self) -> int:
        """Token slots allocated per layer (rows x columns), padding and free rows included."""
        return self.max_rows * self.columns

    def window_length(self) -> int:
        """Past columns a forward attends over (what the model's cache reports as its length)."""
        return self.end - self.start

    def clear(self) -> None:
        """Forget every row (the buffers are kept)."""
        self.n, self.start, self.end = 0, 0, 0
        if self.mask is not None:
            self.mask.zero_()

    # ------------------------------------------------------------------ rows joining and leaving
    def join(self, kv: list[tuple[torch.Tensor, torch.Tensor]], rows: list[int], lengths: list[int]) -> None:
        """Copy rows of a prefill cache in as the last rows: `kv` per layer (keys, values) [b, kv_heads, L, head_dim]
        left-padded, `rows` which of its rows join, `lengths` their prompt lengths (their last columns)."""
        before = self.n
        if before + len(rows) > self.max_rows:
            raise ValueError(f"{self.n} rows run and {len(rows)} join: more than the slab's {self.max_rows} rows")
        if not self.keys:
            self._allocate(kv, self._columns_for(max(lengths) + 1))
        self._make_room(left=max(lengths), right=1)
        for layer, (keys, values) in enumerate(kv):
            for offset, (row, length) in enumerate(zip(rows, lengths)):
                target = self.n + offset
                self.keys[layer][target, :, self.end - length:self.end] = keys[row, :, keys.shape[2] - length:]
                self.values[layer][target, :, self.end - length:self.end] = values[row, :, keys.shape[2] - length:]
        for offset, length in enumerate(lengths):
            self.mask[self.n + offset, self.end - length:self.end] = 1
        self.n += len(rows)
        first = self.end - max(lengths)
        self.start = first if before == 0 else min(self.start, first)

    def remove(self, rows: list[int]) -> list[int]:
        """Free rows; the last rows move into the freed ones. Returns the new order: old row index per row."""
        order = list(range(self.n))
        for row in sorted(set(rows), reverse=True):
            last = self.n - 1
            if row != last:
                for buffers in (self.keys, self.values):
                    for buffer in buffers:
                        buffer[row, :, self.start:self.end] = buffer[last, :, self.start:self.end]
                self.mask[row] = self.mask[last]
                order[row] = order[last]
            self.mask[last] = 0
            order.pop()
            self.n -= 1
        if self.n == 0:
            self.start = self.end = 0
        elif rows:
            self.start = self.end - int(self.mask[:self.n, self.start:self.end].sum(1).max())
        return order

    # ------------------------------------------------------------------ a decode step
    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for the next token and return the forward's attention mask [n, window + 1] and
        position ids [n, 1] (each row's token count)."""
        self._make_room(left=0, right=1)
        positions = self.mask[:self.n, self.start:self.end].sum(1, keepdim=True)
        self.mask[:self.n, self.end] = 1
        return self.mask[:self.n, self.start:self.end + 1], positions

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's new token (keys and values [n, kv_heads, 1, head_dim]) into column `end`; returns the
        window's keys and values (views) for attention."""
        if keys.shape[0] != self.n or keys.shape[2] != 1:
            raise ValueError(f"the slab takes one new token for each of its {self.n} rows, got keys of shape {tuple(keys.shape)}")
        self.keys[layer][:self.n, :, self.end] = keys[:, :, 0]
        self.values[layer][:self.n, :, self.end] = values[:, :, 0]
        return self.keys[layer][:self.n, :, self.start:self.end + 1], self.values[layer][:self.n, :, self.start:self.end + 1]

    def advance(self) -> None:
        """The decode forward wrote column `end`: the next token goes to the one after it."""
        self.end += 1

    # ------------------------------------------------------------------ layout
    def _columns_for(self, need: int) -> int:
        """Columns to allocate for a window of `need`: room for as many again (moves stay rare), at most max_columns."""
        if need > self.max_columns:
            raise ValueError(f"a request needs {need} KV-cache columns, more than the slab's {self.max_columns}")
        columns = max(self.columns, 16)
        while columns < 2 * need and columns < self.max_columns:
            columns *= 2
        return min(columns, self.max_columns)

    def _new_buffers(self, like: list[torch.Tensor], columns: int) -> list[torch.Tensor]:
        return [t.new_zeros(self.max_rows, t.shape[1], columns, t.shape[3]) for t in like]

    def _allocate(self, kv, columns: int) -> None:
        self.keys = self._new_buffers([keys for keys, _ in kv], columns)
        self.values = self._new_buffers([values for _, values in kv], columns)
        self.mask = torch.zeros(self.max_rows, columns, dtype=torch.long, device=kv[0][0].device)

    def _make_room(self, left: int, right: int) -> None:
        """Arrange end >= left (columns before `end` for a joining prompt) and `right` free columns from `end`:
        move the window to the left edge, into larger buffers when it needs more than half of them."""
        width = self.end - self.start
        if self.end >= left and self.end + right <= self.columns:
            return
        end = max(width, left)
        windows = [buffer[:self.n, :, self.start:self.end].clone() for buffer in self.keys + self.values]
        mask = self.mask[:self.n, self.start:self.end].clone()
        columns = self._columns_for(end + right) if end + right > self.columns // 2 else self.columns
        if columns != self.columns:
            self.keys, self.values = self._new_buffers(self.keys, columns), self._new_buffers(self.values, columns)
            self.mask = self.mask.new_zeros(self.max_rows, columns)
        else:
            self.mask[:self.n] = 0
        for buffer, window in zip(self.keys + self.values, windows):
            buffer[:self.n, :, end - width:end] = window
        self.mask[:self.n, end - width:end] = mask
        self.start, self.end = end - width, end
