"""torch.compile applied from outside a model: each block compiled with the backend asked for, what compile
did (graphs, recompiles, graph breaks, fallbacks) and its wording, compiled modules run eagerly on request,
and a missing C++ compiler refused before anything is compiled."""

import pytest
import torch
import torch._dynamo

from transfusion_mot.common.compile import compile_blocks, compile_counts, describe_counts, eager_stance
from transfusion_mot.common.errors import ConfigError


def counting(graphs: list):
    """A torch.compile backend that records each graph it is given and runs it as traced."""

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    return backend


def test_compile_blocks_compiles_every_block_with_the_backend_and_dynamic_shapes():
    """One graph for every block (the blocks are alike) and, dynamic, none more for new lengths."""
    torch._dynamo.reset()
    graphs = []
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()) for _ in range(3)])
    eager = [block(torch.ones(2, 8)) for block in model.blocks]
    compile_blocks(model, backend=counting(graphs))
    for length in (2, 5, 7):
        x = torch.ones(length, 8)
        for block in model.blocks:
            block(x)
    assert len(graphs) == 1
    torch.testing.assert_close([block(torch.ones(2, 8)) for block in model.blocks], eager)


def test_describe_counts_in_words():
    counts = {"graphs": 2, "frames": 3, "graph_breaks": 1, "failed": 0}
    assert describe_counts(counts) == "blocks compiled: 2 graph(s), 1 graph breaks, 0 frames run eagerly"


def test_a_missing_cpp_compiler_is_refused_before_compiling(monkeypatch):
    """inductor builds C++ kernels on a CPU: without a compiler, one line that says so, not a traceback at the
    first batch; another backend, or a model on another device, needs none."""
    from torch._inductor import cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    def no_compiler():
        raise InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        compile_blocks(model)
    assert model.blocks[0]._compiled_call_impl is None  # nothing was compiled
    compile_blocks(model, backend=counting([]))  # no C++ build
    meta = torch.nn.Module()
    with torch.device("meta"):
        meta.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
    compile_blocks(meta)  # initialised later on its own device (FSDP2): not refused here


def test_eager_stance_runs_a_compiled_module_without_compiling_it():
    """Held-out evaluation runs inside `eager_stance`: a compiled block gives the same numbers there and no
    graph is compiled for it (a counting backend sees no call)."""
    compiled_graphs = []
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    x = torch.randn(3, 8)
    expected = block(x)
    block.compile(backend=counting(compiled_graphs))
    with eager_stance():
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
    assert compiled_graphs == []
    torch.testing.assert_close(block(x), expected)
    assert len(compiled_graphs) == 1  # outside it, the compiled module compiles as before


def test_compile_counts_report_graphs_graph_breaks_and_recompiles():
    """What a compiled run reports (summary.json "compile"): each compiled graph, a recompile as one more,
    and each graph break."""
    backend = counting([])

    def f(x):
        return x.sin() + 1

    def broken(x):
        x = x.cos()
        torch._dynamo.graph_break()
        return x + 1

    torch._dynamo.reset()
    before = compile_counts()
    compiled = torch.compile(f, backend=backend, dynamic=False)
    compiled(torch.randn(3))
    compiled(torch.randn(3))  # the same shape: no recompile
    after_one = compile_counts()
    assert after_one["frames"] - before["frames"] == 1 and after_one["graphs"] - before["graphs"] == 1
    assert after_one["graph_breaks"] == before["graph_breaks"]
    compiled(torch.randn(5))  # a static-shape function: a new shape recompiles
    assert compile_counts()["graphs"] - before["graphs"] == 2
    torch.compile(broken, backend=backend)(torch.randn(3))
    assert compile_counts()["graph_breaks"] - before["graph_breaks"] == 1
