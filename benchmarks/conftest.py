"""pytest-benchmark setup for the layer suite (benchmarks/test_layers.py).

Options (defaults: the Llama-3-8B layers, fastlora bench's default M list, rank 16):
    --bench-shapes   'all', models or layers, comma-separated (as `fastlora bench --shapes`)
    --bench-m        tokens per call, comma-separated
    --bench-ranks    LoRA ranks, comma-separated
    --bench-providers
    --bench-out      where results.csv / results.md / speedup_*.png go (benchmarks/results)
Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before anything
imports them) and only the smoke test runs.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

RESULTS = Path(__file__).parent / "results"


def pytest_addoption(parser):
    group = parser.getgroup("fastlora bench")
    group.addoption("--bench-shapes", default="llama3-8b")
    group.addoption("--bench-m", default="1,16,128,512,2048,4096,8192,16384")
    group.addoption("--bench-ranks", default="16")
    group.addoption("--bench-providers", default="all")
    group.addoption("--bench-out", default=str(RESULTS))


def _options(config):
    from fastlora.bench import shapes
    from fastlora.bench.providers import select_providers
    from fastlora.bench.suite import Options

    return Options(shapes=shapes.select_shapes(config.getoption("--bench-shapes")),
                   ms=shapes.parse_positive_ints(config.getoption("--bench-m"), "--bench-m"),
                   ranks=shapes.parse_positive_ints(config.getoption("--bench-ranks"),
                                                    "--bench-ranks"),
                   modes=shapes.MODES,
                   providers=select_providers(config.getoption("--bench-providers")),
                   out=config.getoption("--bench-out"))


def pytest_generate_tests(metafunc):
    """Parametrise test_layer over the selected shapes x ranks x M x modes x providers."""
    if "layer_point" not in metafunc.fixturenames:
        return
    opts = _options(metafunc.config)
    points = [(shape, rank, m, mode, provider) for shape in opts.shapes for rank in opts.ranks
              for m in opts.ms for mode in opts.modes for provider in opts.providers]
    metafunc.parametrize("layer_point", points, ids=[
        f"{s.name}-r{r}-M{m}-{mode}-{p}" for s, r, m, mode, p in points])


@pytest.fixture(scope="session")
def bench_options(pytestconfig):
    return _options(pytestconfig)


@pytest.fixture(scope="session")
def bench_session(bench_options):
    """GPU facts, the providers built per (shape, rank) and the inputs per (shape, M) (one
    at a time, the last kept: tests run in that order), and the rows collected; at the end
    the rows are derived and written like `fastlora bench`."""
    from fastlora.bench import suite

    _, peak, env, l2_bytes = suite.gpu_info()
    state = {"env": env, "key": None, "built": None, "rows": []}

    def providers_for(shape, rank):
        if state["key"] != (shape.name, rank):
            state["built"] = None  # free the previous layer first
            state["built"] = suite.build_providers(bench_options.case(1, shape, rank),
                                                   bench_options.providers)
            state["key"] = (shape.name, rank)
        return state["built"]

    def inputs_for(shape, m):
        if state.get("inputs_key") != (shape.name, m):
            state["inputs"] = None
            state["inputs"] = suite.gpu_inputs(bench_options, shape, m, l2_bytes)
            state["inputs_key"] = (shape.name, m)
        return state["inputs"]

    state["providers_for"] = providers_for
    state["inputs_for"] = inputs_for
    yield state
    os.makedirs(bench_options.out, exist_ok=True)
    suite.derive(state["rows"], bench_options, peak)
    suite.write_gpu_results(bench_options, state["rows"])
