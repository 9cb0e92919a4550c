"""The `fastlora` command: demo | verify | bench | compile-report.

Bad input (an unknown shape, M <= 0, an output folder that cannot be written, ...) ends with
one line on stderr and exit code 2, never a traceback. Without a GPU, the commands that run
kernels set TRITON_INTERPRET=1 before anything imports them (csrc_triton), so the kernels run in
Triton's CPU interpreter; an explicit TRITON_INTERPRET in the environment is respected.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import torch

USAGE_ERROR = 2


class UsageError(Exception):
    """Bad input to the command line: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def _output_dir(path: str) -> str:
    """Create `path` if needed and prove it is writable (UsageError otherwise)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write to output folder {path!r}: "
                         f"{exc.strerror or exc}") from None
    return path


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _interpreter_without_gpu() -> None:
    """No CUDA device: run the Triton kernels in the CPU interpreter (must precede their
    import). Set only when the user has not chosen."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _check_backend() -> None:
    """A bad FASTLORA_BACKEND is bad input: say so before any work, not at the first op."""
    from .backend import requested

    try:
        requested()
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# ----------------------------------------------------------------------------- commands

def _bench(args) -> int:
    from .bench import shapes as S
    from .bench.providers import select_providers
    from .bench.suite import Options, run

    try:
        opts = Options(
            shapes=S.select_shapes(args.shapes),
            ms=S.parse_positive_ints(args.m, "M values (--m)") if args.m
            else (S.M_FULL if args.full else S.M_DEFAULT),
            ranks=S.parse_positive_ints(args.ranks, "ranks (--ranks)") if args.ranks
            else (S.RANKS_FULL if args.full else (S.RANK_DEFAULT,)),
            modes=_modes(args.modes), providers=select_providers(args.providers),
            out=_output_dir(args.out), dtype=args.dtype, quant_type=args.quant,
            blocksize=args.blocksize, double_quant=not args.no_double_quant,
            warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
            compile_report=not args.no_compile_report, gpus=_gpu_names(args.gpu))
        from .bench.suite import check_output_csv

        check_output_csv(opts)  # now, not after the whole run
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return run(opts)


def _gpu_names(specs) -> tuple:
    """The table names of --gpu's GPUs (repeated and/or comma-separated, any case), in order;
    none given: the default pair (fastlora.bench.peaks.MODELLED_GPUS)."""
    from .bench.peaks import MODELLED_GPUS
    from .gpus import gpu_named

    wanted = [name.strip() for spec in specs or () for name in spec.split(",") if name.strip()]
    if specs and not wanted:
        raise ValueError("no GPU given (--gpu)")
    try:
        return tuple(dict.fromkeys(gpu_named(name).name for name in wanted)) or MODELLED_GPUS
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None


def _modes(spec: str) -> tuple:
    from .bench.shapes import MODES
    from .bench.suite import OWN_MODES

    modes = tuple(dict.fromkeys(m.strip().lower() for m in spec.split(",") if m.strip()))
    for mode in modes:
        if mode not in MODES + OWN_MODES:
            raise ValueError(f"unknown mode {mode!r}: choose from "
                             f"{', '.join(MODES + OWN_MODES)}")
    if not modes:
        raise ValueError("no mode given (--modes)")
    return modes


def _verify(args) -> int:
    from . import verify

    out = _output_dir(args.out) if args.out else None
    try:
        verify.preflight()
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None
    return verify.verify(full=args.full, out=out)


def _demo(args) -> int:
    from .demo import DemoError, make_config, run_demo

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        cfg = make_config(device, args.out, steps=args.steps, seed=args.seed,
                          batch_size=args.batch_size, seq_len=args.seq_len, rank=args.rank,
                          lr=args.lr, hidden=args.hidden, layers=args.layers, heads=args.heads,
                          trl=args.trl)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    _output_dir(cfg.out)
    try:
        return run_demo(cfg)
    except DemoError as exc:
        print(f"fastlora demo: error: {exc}", file=sys.stderr)
        return 1


def _compile_report(args) -> int:
    from .bench.suite import compile_rows, write_compile_report

    from .compilecheck import ARCHS

    archs = tuple(dict.fromkeys(a.strip() for a in args.archs.split(",") if a.strip()))
    if archs == ("all",):
        archs = tuple(ARCHS)
    for arch in archs:
        if arch not in ARCHS:
            raise UsageError(f"unknown arch {arch!r}: choose from {', '.join(ARCHS)} or all")
    if not archs:
        raise UsageError("no arch given (--archs)")
    from csrc_triton import all_compile_specs

    kernels = None
    if args.kernels:
        known = sorted({spec.kernel for spec in all_compile_specs()})
        kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
        for name in kernels:
            if name not in known:
                raise UsageError(f"unknown kernel {name!r}: shipped kernels are "
                                 f"{', '.join(known)}")
    if args.write_record:
        if args.kernels or args.headline or args.json or args.out or args.slice:
            raise UsageError("--write-record compiles every config: it takes only --archs")
        from .compilerecord import RECORD_PATH, write_record

        written, kept = write_record(archs)
        print(f"wrote {written} rows ({', '.join(archs)}) to {RECORD_PATH}; kept {kept} rows "
              "of other Triton releases or archs")
        return 0
    record = False if args.compile else None  # None: the record unless the env var says no
    # the headline configs: those with a modelled ceiling target (DESIGN.md, "per-clock budgets")
    # (and their calibration rows: the plain GEMMs of the headline tiles)
    from csrc_triton.calibration import PLAIN_KERNEL

    configs = ([(s.kernel, s.config) for s in all_compile_specs()
                if s.ceiling_target > 0 or s.kernel == PLAIN_KERNEL] if args.headline else None)
    if args.slice:
        from .compilerecord import config_slice
        from .slices import parse_slice

        try:
            part = parse_slice(args.slice)
        except ValueError as exc:
            raise UsageError(f"--slice: {exc}") from None
        configs = config_slice(part, configs)
    if args.json:
        import json

        from .compilecheck import problems

        rows = compile_rows(archs, kernels, configs, record=record)
        print(json.dumps(rows, indent=1))
        return 1 if problems(rows) else 0
    out = _output_dir(args.out) if args.out else None
    return 1 if write_compile_report(out, archs=archs, kernels=kernels, configs=configs,
                                     record=record) else 0


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastlora", description="Fused Triton kernels for QLoRA: demo, "
                     "verification, benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="QLoRA fine-tuning of a tiny Llama, patched by fastlora "
                          "(defaults per device: fastlora.demo.PRESETS)")
    demo.add_argument("--steps", type=_positive, default=None, help="training steps")
    demo.add_argument("--out", default="fastlora-demo", help="folder for loss.png / loss.csv")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--batch-size", type=_positive, default=None)
    demo.add_argument("--seq-len", type=_positive, default=None)
    demo.add_argument("--rank", type=_positive, default=None, help="LoRA rank")
    demo.add_argument("--lr", type=float, default=None)
    demo.add_argument("--hidden", type=_positive, default=None,
                      help="model width, a multiple of 64 (intermediate size: 2x)")
    demo.add_argument("--layers", type=_positive, default=None)
    demo.add_argument("--heads", type=_positive, default=None)
    demo.add_argument("--trl", action="store_true",
                      help="also fine-tune through TRL's SFTTrainer with "
                           "fastlora.FastLoRACallback; both loss curves in loss.png (needs "
                           "fastlora[trl])")
    demo.set_defaults(run=_demo, kernels=True)

    verify = sub.add_parser("verify", help="kernels vs the float64 reference; non-zero exit on "
                            "any failure")
    verify.add_argument("--full", action="store_true", help="the larger matrix (slow on CPU)")
    verify.add_argument("--out", default=None, help="also write verify.md / verify.csv here")
    verify.set_defaults(run=_verify, kernels=True)

    bench = sub.add_parser("bench", help="per-layer benchmark suite (GPU); smoke pass and "
                           "modelled table without one")
    bench.add_argument("--shapes", default="llama3-8b",
                       help="'all', models (llama3-8b, mistral-7b, qwen2.5-7b, llama2-70b) or "
                       "layers (llama3-8b.q_proj), comma-separated")
    bench.add_argument("--m", default=None, help="tokens per call, comma-separated "
                       "(default 1,16,128,512,2048,4096,8192,16384)")
    bench.add_argument("--ranks", default=None, help="LoRA ranks (default 16; --full: 8,16,64)")
    bench.add_argument("--modes", default="forward,backward,full",
                       help="forward, backward, full (per layer), block (the q/k/v and "
                            "gate/up blocks of each selected model: per-layer vs grouped "
                            "fastlora vs PEFT), dora (DoRA layers: fastlora DoRA vs its "
                            "plain LoRA layer vs PEFT DoRA), mixed (1, 4, 16 adapters in "
                            "one batch: fastlora vs one adapter vs PEFT's mixed batch vs one "
                            "adapter at a time) and sft (TRL's SFTTrainer steps/s on a small "
                            "4-bit Llama, with fastlora.FastLoRACallback vs without; needs "
                            "fastlora[trl]) and host (the Python time of one layer call at "
                            "M = 1, launches recorded: patched vs PEFT), decode (one decoder "
                            "layer's forward at M = 1, 4, 16: fastlora per layer and grouped "
                            "vs PEFT + bitsandbytes vs dequantize + cuBLAS against the "
                            "weight-read floor; modelled without a GPU, measured with one)")
    bench.add_argument("--providers", default="all",
                       help="fastlora,peft_bnb,dequant_mm,reference,unsloth or 'all'")
    bench.add_argument("--full", action="store_true", help="M = 1..16384 in powers of two, "
                       "ranks 8,16,64")
    bench.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    bench.add_argument("--quant", choices=("nf4", "fp4"), default="nf4")
    bench.add_argument("--blocksize", type=int, default=64,
                       choices=(32, 64, 128, 256, 512, 1024, 2048, 4096))
    bench.add_argument("--no-double-quant", action="store_true")
    bench.add_argument("--warmup-ms", type=_positive, default=25)
    bench.add_argument("--rep-ms", type=_positive, default=100)
    bench.add_argument("--gpu", action="append", default=None, metavar="NAME",
                       help="GPUs of the modelled tables (without a GPU), by their name in "
                       "fastlora/gpus.py, e.g. 'H100 SXM', 'RTX 4090'; repeat it or "
                       "comma-separate (default: H100 SXM and A100 SXM 80GB)")
    bench.add_argument("--no-compile-report", action="store_true",
                       help="skip the compile report at the end (it compiles every shipped "
                       "kernel config: minutes on a small CPU)")
    bench.add_argument("--out", default="fastlora-bench", help="results folder")
    bench.set_defaults(run=_bench, kernels=True)

    report = sub.add_parser("compile-report", help="compile every shipped kernel config for "
                            "sm_80/sm_90 (or --archs) here; non-zero exit on spills, missing "
                            "MMA or shared memory past the arch's limit")
    report.add_argument("--archs", default="sm_80,sm_90",
                        help="comma-separated compile targets (sm_80, sm_86, sm_89, sm_90, "
                        "sm_100, sm_120) or 'all'; sm_86/sm_89/sm_100/sm_120 compile the sm_80 "
                        "config lists")
    report.add_argument("--kernels", default=None,
                        help="only these kernels (comma-separated names, e.g. "
                        "_dequant_4bit_kernel); default: all")
    report.add_argument("--headline", action="store_true",
                        help="only the headline configs (those with a modelled ceiling target)")
    report.add_argument("--out", default=None, help="also write compile_report.md here")
    report.add_argument("--json", action="store_true",
                        help="print the rows as JSON (one object per kernel x config x arch)")
    report.add_argument("--slice", default=None, metavar="I/N",
                        help="only slice I (0-based) of N of the configs, by a stable hash of "
                        "kernel and config (CI checks one slice a run on other Tritons)")
    report.add_argument("--compile", action="store_true",
                        help="compile every row here, reading nothing from the committed "
                        "compile record (default: rows whose key matches come from it; "
                        "fastlora/compilerecord.py)")
    report.add_argument("--write-record", action="store_true",
                        help="compile every shipped config for --archs and rewrite the "
                        "compile record for this Triton (after a kernel or model change)")
    report.set_defaults(run=_compile_report, kernels=False)
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # bitsandbytes warns on import, on CPUs with AVX512-BF16, that an optional CPU kernel
    # package is missing: not something a fastlora user needs to act on
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if args.kernels:
        _interpreter_without_gpu()
    try:
        if args.kernels:
            _check_backend()
        return args.run(args)
    except UsageError as exc:
        print(f"fastlora {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"fastlora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
