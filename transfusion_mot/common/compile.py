"""torch.compile applied from outside a model, shared by training and sampling: each of the model's blocks
compiled with dynamic shapes, what compile did in this process, and a context that runs compiled modules
eagerly."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from .errors import ConfigError


def compile_blocks(model: nn.Module, backend: str | Callable = "inductor") -> None:
    """Compile each of `model.blocks` separately: the blocks are identical, so one graph serves them all and
    compiling is fast. Dynamic shapes, since routing sizes, sequence and cache lengths change from batch to
    batch. The first call of a new kind (training step, prefix, denoising step) compiles its graph.
    `backend`: torch.compile's ("aot_eager" traces the same graphs without inductor's C++ build). On a CPU,
    inductor needs a C++ compiler: without one, ConfigError here rather than a traceback at the first batch."""
    if backend == "inductor" and any(p.device.type == "cpu" for p in model.parameters()):
        from torch._inductor import cpp_builder
        from torch._inductor.exc import InvalidCxxCompiler

        try:
            cpp_builder.get_cpp_compiler()
        except InvalidCxxCompiler:
            raise ConfigError("compiling on a CPU builds C++ kernels, and no C++ compiler was found (g++ or clang++ "
                              "on PATH, or $CXX): install one (Debian: apt-get install g++), or run without "
                              "compiling") from None
    for block in model.blocks:
        block.compile(dynamic=True, backend=backend)


def compile_counts() -> dict[str, int]:
    """What torch.compile did in this process so far: `graphs` compiled (a recompile is one more), `frames`
    dynamo processed, `graph_breaks`, and frames it `failed` on (run eagerly). Counted over the whole
    process: on a GPU the compiled FlexAttention is in it too. Reported by runs, sampling and benchmarks that
    compile, so that a recompile or a fallback shows instead of only costing time."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "frames": counters["frames"]["ok"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "failed": counters["frames"]["total"] - counters["frames"]["ok"]}


def describe_counts(counts: dict[str, int]) -> str:
    """`compile_counts()` in words, for reports and command output."""
    return (f"blocks compiled: {counts['graphs']} graph(s), {counts['graph_breaks']} graph breaks, "
            f"{counts['failed']} frames run eagerly")


def eager_stance() -> AbstractContextManager:
    """Compiled modules run eagerly inside this context (torch.compiler.set_stance; torch < 2.6 has none, and
    there they run as they are)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else nullcontext()


__all__ = ["compile_blocks", "compile_counts", "describe_counts", "eager_stance"]
