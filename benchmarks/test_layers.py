"""The per-layer QLoRA benchmark as pytest-benchmark tests (timing through fastlora.bench).

Each test times one provider on one shape / rank / M / mode. pytest-benchmark's own table times
the call plus a CUDA synchronize; the numbers the suite reports (benchmark.extra_info and
benchmarks/results/) come from triton.testing.do_bench: CUDA events, L2 flushed, inputs rotated.
Run on a GPU:  pytest benchmarks/ --benchmark-only  (see benchmarks/README.md).
"""

import dataclasses

import pytest
import torch

from fastlora.bench import suite
from fastlora.bench.timing import mode_callable

gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                         reason="timings need a CUDA GPU; without one run `fastlora bench` for "
                                "the smoke pass and the modelled table")


@gpu
def test_layer(benchmark, bench_options, bench_session, layer_point):
    shape, rank, m, mode, provider = layer_point
    built, skipped = bench_session["providers_for"](shape, rank)
    if provider in skipped:
        pytest.skip(f"{provider}: {skipped[provider]}")
    xs, dys = bench_session["inputs_for"](shape, m)
    row = suite.measure_row(bench_options, bench_session["env"], shape, rank, m, mode,
                            provider, built, skipped, xs, dys)
    bench_session["rows"].append(row)
    assert row["status"] == "ok", row["status"]
    benchmark.extra_info.update({k: row[k] for k in ("median_ms", "p20_ms", "p80_ms",
                                                      "peak_mib")})
    run = mode_callable(built[provider], mode, xs, dys)
    grads = list(xs) + list(built[provider].params)

    def call():
        for t in grads:
            t.grad = None
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=20, warmup_rounds=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_smoke_without_gpu(bench_options, tmp_path):
    """No GPU: every provider runs forward + backward on tiny shapes (kernels in the
    interpreter) and matches the float64 reference; nothing is timed."""
    assert suite.run_smoke(dataclasses.replace(bench_options, out=str(tmp_path))) == 0
