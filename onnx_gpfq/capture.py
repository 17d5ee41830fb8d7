"""Stage 3: run calibration data through the network in segments, one stream at a time.

A ``Stream`` holds the *frontier*: the tensors computed so far that nodes not yet run still need,
for every calibration batch. ``advance`` runs only the nodes not yet run that the requested tensors
depend on (one onnxruntime session for that segment, over all batches), adds their outputs to the
frontier and drops what nothing later reads. So over a whole quantization run every node executes
at most once per calibration sample and stream, and no prefix of the network is ever re-run.

Two streams advance side by side: the float network (X) and the partially quantized network (X~),
whose graph changes between segments as layers get quantized (see ``rewrite.apply``).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import helper

from . import runtime
from .graph import node_inputs, producers
from .npyfile import FileArray

Batch = dict[str, np.ndarray]


class Spill:
    """Where frontier tensors live: in memory up to ``budget`` bytes (shared by both streams), then
    on disk under ``folder`` (the caller removes the folder when done), read back one batch at a
    time when used, so that what lies on disk never counts in the process's resident memory.
    Calibration batches that are still in the user's file (``npyfile.FileArray``) are read from
    there the same way: never copied, never counted.

    On disk is one file, an arena kept open for the whole run: a spilled batch takes the smallest
    free extent that holds it (or the end of the file), and a released one gives its extent back
    (merged with free neighbours). Plain positioned writes and reads (os.pwrite / os.preadv): the
    pages go through the OS's page cache, never into this process's memory, nothing waits for
    the disk (no msync), and freed extents are overwritten in place, where a file per batch paid
    an open, a fresh allocation of page-cache pages and an unlink for every batch.

    ``in_memory`` (bytes held now) never exceeds ``budget`` when there is a folder to spill to:
    ``peak_in_memory``, its high-water mark, is the bound's witness (reported, and tested)."""

    def __init__(self, budget: int | None = None, folder: str | None = None):
        self.budget, self.folder = budget, folder
        self.in_memory = 0
        self.peak_in_memory = 0  # the most bytes ever held at once
        self.spilled_bytes = 0  # total ever written to disk (for the report)
        self.on_disk = 0  # bytes of the batches spilled and not yet released
        self._fd: int | None = None
        self._path: str | None = None
        self._end = 0  # the arena file's length
        self._free: list[tuple[int, int]] = []  # free extents (offset, size), sorted by offset

    def keep(self, array: "np.ndarray | FileArray", caller_data: bool = False) -> "np.ndarray | FileArray":
        """The array, held in memory (counted against the budget) or spilled. caller_data: a
        calibration batch, possibly a view of the caller's arrays, which stay alive anyway: held
        as it is, without a copy (or left in its file, when it is a FileArray)."""
        if isinstance(array, FileArray):
            return array
        if self.budget is None or self.folder is None or self.in_memory + array.nbytes <= self.budget:
            if array.base is not None and not caller_data:
                # not its own buffer: own it. A view of the whole calibration array would keep all of
                # it alive, and an onnxruntime output keeps its block of the session's arena alive,
                # so the arena would grow run after run and the peak memory with it
                array = array.copy()
            self.in_memory += array.nbytes
            self.peak_in_memory = max(self.peak_in_memory, self.in_memory)
            return array
        if self._fd is None:
            self._path = os.path.join(self.folder, "spill.bin")
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        offset = self._allocate(data.nbytes)
        done = 0
        while done < data.nbytes:  # pwrite may write less than asked (at most ~2 GiB a call)
            done += os.pwrite(self._fd, data[done:], offset + done)
        self.spilled_bytes += data.nbytes
        self.on_disk += data.nbytes
        return Spilled(self._path, offset, array.shape, array.dtype, self._fd)

    def _allocate(self, size: int) -> int:
        """The offset of ``size`` free bytes: the smallest free extent that holds them, else the end."""
        fits = [(extent, i) for i, extent in enumerate(self._free) if extent[1] >= size]
        if not fits:
            offset, self._end = self._end, self._end + size
            return offset
        (offset, free), i = min(fits, key=lambda f: (f[0][1], f[0][0]))
        if free == size:
            del self._free[i]
        else:
            self._free[i] = (offset + size, free - size)
        return offset

    def _give_back(self, offset: int, size: int) -> None:
        i = bisect.bisect(self._free, (offset, size))
        if i < len(self._free) and offset + size == self._free[i][0]:  # merge with the next extent
            size += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:  # and with the previous one
            offset, size = self._free[i - 1][0], self._free[i - 1][1] + size
            del self._free[i - 1]
            i -= 1
        if offset + size == self._end:  # the file's tail: shrink the arena instead
            self._end = offset
        else:
            self._free.insert(i, (offset, size))

    def release(self, entry: "np.ndarray | FileArray") -> None:
        if isinstance(entry, Spilled):
            self._give_back(entry.offset, entry.nbytes)
            self.on_disk -= entry.nbytes
        elif not isinstance(entry, FileArray):  # a calibration batch in the user's file: nothing held
            self.in_memory -= entry.nbytes

    def release_all(self, batches: "Batches") -> None:
        """Give back every batch of a tensor kept by ``keep`` that nothing else holds."""
        for entry in batches.entries():
            self.release(entry)
        del batches[:]

    def close(self) -> None:
        """Close the arena file (its folder is the caller's to remove); nothing spilled can be read after."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


class Spilled(FileArray):
    """A spilled batch of one tensor: an extent of the Spill's arena file, read through the
    Spill's open descriptor ``fd``."""

    __slots__ = ("fd",)

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype, fd: int):
        super().__init__(path, offset, shape, dtype)
        self.fd = fd

    def read(self) -> np.ndarray:
        return self._read_from(self.fd)


class Batches(list):
    """One tensor over all calibration batches: a list whose items are arrays; batches spilled to
    disk are read back (a fresh array, freed after use) when indexed or iterated. ``owners``:
    the streams holding it (the model inputs are held once for both streams)."""

    owners = 1

    def __getitem__(self, i):
        entry = list.__getitem__(self, i)
        return entry.read() if isinstance(entry, FileArray) else entry

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def entries(self) -> list:
        """The stored items themselves (arrays or FileArrays), nothing read."""
        return list(list.__iter__(self))

    def shapes(self) -> list[tuple[int, ...]]:
        """Each batch's shape, nothing read from disk."""
        return [tuple(e.shape) for e in self.entries()]


def inputs(batches: Sequence[Batch], spill: Spill) -> dict[str, Batches]:
    """The model inputs over all calibration batches, kept in memory (the caller's arrays
    themselves, no copy), left in the user's file (FileArray batches) or spilled by ``spill``; give the result to two Streams to hold the data
    once."""
    kept = {name: Batches(spill.keep(b[name], caller_data=True) for b in batches) for name in batches[0]}
    for b in kept.values():
        b.owners = 0  # counted by the streams that take them
    return kept


class Stream:
    """Segment-by-segment execution of one network over a fixed list of calibration batches."""

    def __init__(self, batches: "Sequence[Batch] | dict[str, Batches]", model: onnx.ModelProto, threads: int = 0,
                 spill: Spill | None = None):
        """batches: the calibration batches, or the model inputs already kept by ``inputs`` (shared
        with another stream over the same data and Spill)."""
        self.spill = spill or Spill()
        if isinstance(batches, dict):
            self.values: dict[str, Batches] = dict(batches)
            for b in batches.values():
                b.owners += 1
        else:
            self.values = inputs(batches, self.spill)
            for b in self.values.values():
                b.owners = 1
        self.n_batches = len(next(iter(self.values.values())))
        self.done: set[str] = set()  # nodes already run, by name
        self.opset_import = list(model.opset_import)
        self.ir_version = model.ir_version
        self.functions = list(model.functions)
        self.threads = threads
        self.nodes_run = 0  # for tests: total node executions (per batch)

    def advance(
        self,
        nodes: list[onnx.NodeProto],
        inits: dict[str, onnx.TensorProto],
        needed: Iterable[str],
        collect: set[str] | frozenset[str] = frozenset(),
    ) -> list[str]:
        """Compute ``needed`` tensors (and keep any ``collect`` tensor the segment produces).

        nodes: the current graph's nodes in topological order; inits: its initializers.
        Returns the names in ``collect`` that this segment produced.
        """
        needed = list(needed)
        producer = producers(nodes)
        selected: dict[str, onnx.NodeProto] = {}
        stack = [n for n in needed if n not in self.values]
        while stack:
            name = stack.pop()
            node = producer.get(name)
            if node is None:
                if name in inits:
                    continue
                raise RuntimeError(f"tensor {name!r} is neither computed, nor a graph input, nor an initializer")
            if node.name in selected or node.name in self.done:
                continue
            selected[node.name] = node
            stack.extend(n for n in node_inputs(node) if n not in self.values and n not in inits)
        segment = [n for n in nodes if n.name in selected]
        produced_collect: list[str] = []
        if segment:
            produced = {o for n in segment for o in n.output if o}
            pending = [n for n in nodes if n.name not in selected and n.name not in self.done]
            later_reads = {i for n in pending for i in node_inputs(n)}
            outputs = sorted(o for o in produced if o in later_reads or o in needed or o in collect)
            produced_collect = [o for o in outputs if o in collect]
            results = self._run(segment, inits, outputs)
            self.values.update(results)
            self.done.update(selected)
            self.nodes_run += len(segment)
        self._prune(nodes, keep=set(needed) | set(produced_collect))
        return produced_collect

    def peek(self, nodes: list[onnx.NodeProto], inits: dict[str, onnx.TensorProto], name: str) -> Batches:
        """Tensor ``name`` over all batches, computed from the frontier by the nodes not yet run
        that it needs, without recording them as run or adding it to the frontier. It is kept under
        the stream's Spill (in memory within the budget, beyond it on disk): give it back with
        ``self.spill.release_all`` when done."""
        producer = producers(nodes)
        selected: dict[str, onnx.NodeProto] = {}
        stack = [name]
        while stack:
            node = producer.get(stack.pop())
            if node is None or node.name in selected or node.name in self.done:
                continue
            selected[node.name] = node
            stack.extend(n for n in node_inputs(node) if n not in self.values and n not in inits)
        segment = [n for n in nodes if n.name in selected]
        return self._run(segment, inits, [name])[name]

    def _run(self, segment: list[onnx.NodeProto], inits: dict[str, onnx.TensorProto], outputs: list[str],
             spill: Spill | None = None) -> dict[str, Batches]:
        spill = spill or self.spill
        produced = {o for n in segment for o in n.output}
        reads: list[str] = []
        for n in segment:
            reads.extend(i for i in node_inputs(n) if i not in produced and i not in reads)
        feeds = [r for r in reads if r in self.values]
        used_inits = [inits[r] for r in reads if r not in self.values and r in inits]
        inputs = []
        for name in feeds:
            sample = self.values[name].entries()[0]
            inputs.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(np.dtype(sample.dtype)), [None] * len(sample.shape)))
        graph = helper.make_graph(segment, "segment", inputs, [onnx.ValueInfoProto(name=o) for o in outputs],
                                  initializer=used_inits)
        model = helper.make_model(graph, opset_imports=self.opset_import, ir_version=self.ir_version)
        model.functions.extend(self.functions)
        session = runtime.session(model.SerializeToString(), self.threads, optimization="disable")
        results: dict[str, Batches] = {o: Batches() for o in outputs}
        for b in range(self.n_batches):
            arrays = session.run(outputs, {name: self.values[name][b] for name in feeds})
            for name, array in zip(outputs, arrays):
                results[name].append(spill.keep(array))
        return results

    def _prune(self, nodes: list[onnx.NodeProto], keep: set[str]) -> None:
        """Forget frontier tensors that no node still to run reads."""
        still_read = {i for n in nodes if n.name not in self.done for i in node_inputs(n)}
        for name in list(self.values):
            if name not in still_read and name not in keep:
                batches = self.values.pop(name)
                batches.owners -= 1
                if batches.owners == 0:
                    for entry in batches.entries():
                        self.spill.release(entry)
