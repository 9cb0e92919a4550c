"""The benchmark suite behind `fastlora bench` (and benchmarks/ for pytest-benchmark).

    shapes     the layer shapes of real models, M and rank sweeps
    providers  the implementations compared (fastlora, PEFT + bitsandbytes, ...)
    timing     do_bench timing with rotated inputs, peak memory
    model      counted FLOPs / minimum bytes per provider and the roofline model
    peaks      datasheet peaks per GPU: a view of the GPU table, fastlora/gpus.py
    report     CSV / markdown / PNG writers
    suite      the runs: GPU timing, or (no GPU) smoke pass + modelled table
    gpu_check  benchmarks/gpu_check.sh's preflight and one-screen summary
"""
