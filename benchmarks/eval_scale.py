"""Evaluation at ImageNet scale on one machine: time and peak memory of reading cached features, of the weighted
k-NN (against the machine's bare ``torch.mm`` rate on the same shapes) and of the fast linear probe (issue 27).

Synthetic, class-structured features of ImageNet's size (1,281,167 training rows; ``--scales`` also runs half and
a quarter of it, to show how time and memory grow) are written once through the project's own writer
(``benchmarks/eval_scale_data.py``, cached under ``--data``), then every (scale, stage) runs in a fresh Python
process that records its resident memory after its imports and its peak above that (``VmHWM``), as the issue
measures it:

* ``knn``: ``read_features`` of train and val, then ``knn_classify`` of ``--queries`` val rows (ks 10, 20, 100,
  200); the bare ``torch.mm`` of one query chunk by one training chunk (the k-NN's own shapes) is timed before and
  after, and the k-NN's effective rate (2 x queries x train x dim FLOP / its time) is given as a fraction of the
  faster of the two;
* ``probe``: ``read_features`` of train and val, then ``linear_probe_on_features`` for ``--epochs`` epochs (time
  per epoch; a full 100-epoch run is not needed to know its cost).

    .venv/bin/python benchmarks/eval_scale.py --stage knn                       # 384-d, 1/4, 1/2, 1 x ImageNet
    .venv/bin/python benchmarks/eval_scale.py --stage probe --dim 1536 --val 50000 --epochs 3 --scales 1
    .venv/bin/python benchmarks/eval_scale.py --stage knn --store float16       # the float16 feature store
    .venv/bin/python benchmarks/eval_scale.py --stage knn --code /tmp/base      # another checkout's dino_model

Before each process the 1-minute load average is waited on (``--max-load``; the machine is shared) and recorded.
Results go in docs/benchmarks.md with the machine; ``--json`` appends each row to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KS = (10, 20, 100, 200)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _gb(kb: int) -> float:
    return kb * 1024 / 1e9


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _read(uri: str, split: str, stored: bool):
    from dino_model.eval.features import read_features

    started = time.perf_counter()
    out = read_features(uri, split, dtype=None) if stored else read_features(uri, split)
    return out, time.perf_counter() - started


def _mm_rate(queries, train, chunk: int, train_chunk: int, seconds: float = 8.0) -> float:
    """GFLOP/s of ``torch.mm`` of one normalised query chunk by one normalised training chunk (the k-NN's shapes),
    repeated for about ``seconds``; the best of writing into a reused buffer and allocating the product."""
    import torch
    import torch.nn.functional as F

    q = F.normalize(torch.as_tensor(queries[:chunk]).float(), dim=1)
    b = F.normalize(torch.as_tensor(train[:train_chunk]).float(), dim=1)
    out = torch.empty(q.shape[0], b.shape[0])
    flop = 2.0 * q.shape[0] * b.shape[0] * q.shape[1]
    rates = []
    for use_out in (True, False):
        torch.mm(q, b.T, out=out)  # warm-up
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 2:
            if use_out:
                torch.mm(q, b.T, out=out)
            else:
                del out
                out = torch.mm(q, b.T)
            n += 1
        rates.append(n * flop / (time.perf_counter() - started) / 1e9)
    return max(rates)


def _stage_knn(args, row: dict) -> None:
    import inspect

    from dino_model.eval.knn import knn_classify

    (_, tr_l, tr_f, _), row["read_s"] = _read(args.uri, "train", args.store == "float16")
    (_, va_l, va_f, _), _ = _read(args.uri, "val", args.store == "float16")
    va_l, va_f = va_l[: args.queries], va_f[: args.queries]
    row["read_peak_gb"] = _gb(_status_kb("VmHWM")) - row["after_imports_gb"]
    row["features_gb"] = tr_f.nbytes / 1e9
    _log(f"read {tr_f.shape} {tr_f.dtype} in {row['read_s']:.1f} s; peak +{row['read_peak_gb']:.2f} GB")
    params = inspect.signature(knn_classify).parameters
    chunk, train_chunk = params["chunk_size"].default, params["train_chunk_size"].default
    mm_before = _mm_rate(va_f, tr_f, chunk, train_chunk)
    _log(f"bare torch.mm {chunk} x {train_chunk} x {tr_f.shape[1]}: {mm_before:.1f} GFLOP/s; k-NN of "
         f"{va_f.shape[0]} queries ...")
    _reset_peak()
    started = time.perf_counter()
    extra = {"progress": True} if "progress" in params else {}
    res = knn_classify(tr_f, tr_l, va_f, va_l, ks=KS, **extra)
    row["knn_s"] = time.perf_counter() - started
    row["knn_peak_gb"] = _gb(_status_kb("VmHWM")) - row["after_imports_gb"]
    row["peak_gb"] = max(row["read_peak_gb"], row["knn_peak_gb"])
    mm_after = _mm_rate(va_f, tr_f, chunk, train_chunk)
    row["mm_gflops"] = max(mm_before, mm_after)
    row["knn_gflops"] = 2.0 * va_f.shape[0] * tr_f.shape[0] * tr_f.shape[1] / row["knn_s"] / 1e9
    row["fraction_of_mm"] = row["knn_gflops"] / row["mm_gflops"]
    row["scores"] = {f"knn{k}_top1": r["top1"] for k, r in res.items()}
    _log(f"k-NN {row['knn_s']:.1f} s = {row['knn_gflops']:.1f} GFLOP/s = {row['fraction_of_mm']:.2f} of torch.mm "
         f"(before {mm_before:.1f}, after {mm_after:.1f}); peak +{row['peak_gb']:.2f} GB; {row['scores']}")


def _stage_probe(args, row: dict) -> None:
    from dino_model.eval.linear_probe import linear_probe_on_features

    (_, tr_l, tr_f, _), row["read_s"] = _read(args.uri, "train", args.store == "float16")
    (_, va_l, va_f, _), _ = _read(args.uri, "val", args.store == "float16")
    row["read_peak_gb"] = _gb(_status_kb("VmHWM")) - row["after_imports_gb"]
    row["features_gb"] = tr_f.nbytes / 1e9
    _log(f"read {tr_f.shape} {tr_f.dtype} in {row['read_s']:.1f} s; peak +{row['read_peak_gb']:.2f} GB; "
         f"probe for {args.epochs} epoch(s) ...")
    stamps = [time.perf_counter()]

    def on_epoch_end(h: dict) -> None:
        stamps.append(time.perf_counter())
        _log(f"epoch {h['epoch']}: {stamps[-1] - stamps[-2]:.1f} s, loss {h['train_loss']:.3f}, "
             f"val top-1 {h['val_top1']:.2f}")

    res = linear_probe_on_features(tr_f, tr_l, va_f, va_l, epochs=args.epochs, num_classes=args.classes,
                                   on_epoch_end=on_epoch_end)
    row["epoch_s"] = [b - a for a, b in zip(stamps, stamps[1:])]
    row["peak_gb"] = _gb(_status_kb("VmHWM")) - row["after_imports_gb"]
    row["scores"] = {"linear_final_top1": res.final_top1}


def child(args) -> None:
    """One stage in this (fresh) process; prints its row as JSON on the last line of stdout."""
    import numpy  # noqa: F401 - the imports a stage needs, before the baseline memory is taken
    import torch

    import dino_model.eval.features  # noqa: F401
    import dino_model.eval.knn  # noqa: F401
    import dino_model.eval.linear_probe  # noqa: F401

    row = {"stage": args.stage, "uri": args.uri, "store": args.store, "torch_threads": torch.get_num_threads(),
           "code": str(Path(dino_model.eval.features.__file__).parents[2]), "load_start": os.getloadavg()}
    row["after_imports_gb"] = _gb(_status_kb("VmRSS"))
    _reset_peak()
    {"knn": _stage_knn, "probe": _stage_probe}[args.stage](args, row)
    row["load_end"] = os.getloadavg()
    print(json.dumps(row), flush=True)


def _wait_for_load(max_load: float, patience_s: float) -> None:
    started = time.time()
    while os.getloadavg()[0] > max_load and time.time() - started < patience_s:
        _log(f"load average {os.getloadavg()[0]:.2f} > {max_load}: waiting")
        time.sleep(15)


def _run(cmd: list[str], code: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = code
    return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=("knn", "probe"), default="knn")
    parser.add_argument("--scales", default="0.25,0.5,1", help="fractions of ImageNet's 1,281,167 training rows")
    parser.add_argument("--dim", type=int, default=384, help="384: ViT-S k-NN; 1536: ViT-S linear probe (4 x 384)")
    parser.add_argument("--val", type=int, default=10_000, help="validation rows written (ImageNet: 50,000)")
    parser.add_argument("--queries", type=int, default=10_000, help="k-NN queries (the first val rows)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3, help="linear-probe epochs timed")
    parser.add_argument("--store", choices=("float32", "float16"), default="float32", help="stored feature type")
    parser.add_argument("--data", type=Path, default=Path("/tmp/eval-scale"), help="where the features are cached")
    parser.add_argument("--code", help="run the stages with this folder first on PYTHONPATH (e.g. a baseline)")
    parser.add_argument("--max-load", type=float, default=1.5, help="wait until the 1-min load is below this")
    parser.add_argument("--patience", type=float, default=900, help="seconds to wait for the load at most")
    parser.add_argument("--json", type=Path, help="append each result row (JSON) to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    print(f"{platform.node()} · {os.cpu_count()} CPUs · {_cpu_model()} · {_mem_total_gib():.0f} GiB · "
          f"Python {platform.python_version()}", flush=True)
    for scale in (float(s) for s in args.scales.split(",")):
        rows = round(scale * 1_281_167)
        data = args.data / f"n{rows}_v{args.val}_d{args.dim}_{args.store}"
        _log(f"features: {data}")
        _run([sys.executable, str(HERE / "eval_scale_data.py"), str(data), "--train", str(rows), "--val",
              str(args.val), "--dim", str(args.dim), "--classes", str(args.classes), "--dtype", args.store], None)
        _wait_for_load(args.max_load, args.patience)
        cmd = [sys.executable, __file__, "--child", "--stage", args.stage, "--uri", str(data), "--queries",
               str(args.queries), "--epochs", str(args.epochs), "--classes", str(args.classes), "--store", args.store]
        row = json.loads(_run(cmd, args.code).stdout.strip().splitlines()[-1])
        row.update(scale=scale, train_rows=rows, dim=args.dim)
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 0.0


if __name__ == "__main__":
    main()
