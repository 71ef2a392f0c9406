"""Shard-writing and shard-reading throughput, beside plain ``tar`` over the same files on the same disk.

    .venv/bin/python benchmarks/shard_throughput.py                       # imagenette-128/train from ../shared
    .venv/bin/python benchmarks/shard_throughput.py --source DIR --workers 4 --no-s3 --no-flow
    .venv/bin/python benchmarks/shard_throughput.py --runners threads,processes,dask --workers 2

Rows (best of ``--repeat`` runs, page cache warm — the source is read once first):

* ``tar -cf``: the floor — GNU tar copying the same files into one archive on the same disk.
* ``decode only``: validating every image by decoding it, nothing written (the writer's unavoidable CPU cost).
* ``writer -> local``: ``dino_model.data.shard_writer.write_dataset`` (scan, plan, validate, write tars, manifest).
* ``flow -> local``: the ``dino-shard`` Prefect flow, server already warm (adds task orchestration), once per task
  runner of ``--runners``: ``threads`` (Prefect's thread pool in the flow's process), ``processes`` (Prefect's
  process pool, started by each run: its start-up is in the time), ``dask`` (a running ``dask scheduler`` with
  ``--workers`` single-threaded ``dask worker`` processes on this machine, ``infra.services.start_dask_cluster``,
  reached as ``tcp://``: the cluster's start-up is not in the time).
* ``writer -> SeaweedFS``: the same writer to ``s3://`` on a local SeaweedFS (``infra.services.start_seaweedfs``).
* ``read (webdataset + PIL)``: samples/s decoding the local shards back to RGB arrays.

Throughput in MB/s is of the *input* bytes. Results are recorded in ``docs/benchmarks.md`` with the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dino_model.data.images import ImageOptions, prepare_image  # noqa: E402
from dino_model.data.shard_writer import ShardOptions, write_dataset  # noqa: E402
from dino_model.data.sources import SourceSpec, scan_source  # noqa: E402


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "imagenette-128" / "train"))
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--work-dir", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--no-flow", action="store_true")
    p.add_argument("--runners", default="threads",
                   help="task runners of the flow rows, comma-separated: threads, processes, dask (default threads)")
    args = p.parse_args()

    source = Path(args.source).resolve()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="shard-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    scan = scan_source(SourceSpec(str(source)))
    n = len(scan.items)
    mb = sum(it.size for it in scan.items) / 1e6
    for it in scan.items:  # warm the page cache: every row reads from memory, like tar's
        it.read()
    options = ShardOptions(name="bench", shard_size=args.shard_size)
    rows: list[tuple[str, float, int]] = []

    def plain_tar():
        out = work / "plain.tar"
        out.unlink(missing_ok=True)
        subprocess.run(["tar", "-cf", str(out), "-C", str(source.parent), source.name], check=True)
        # same durability as the writer, which fsyncs each shard before renaming it into place
        with open(out, "rb+") as f:
            os.fsync(f.fileno())

    rows.append(("tar -cf", best_of(args.repeat, plain_tar), n))

    def decode_only():
        image_options = ImageOptions()
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda it: prepare_image(it.read(), image_options).ok, scan.items))

    rows.append((f"decode only ({args.workers} threads)", best_of(args.repeat, decode_only), n))

    def writer_local():
        dest = work / "local"
        shutil.rmtree(dest, ignore_errors=True)
        write_dataset(scan_source(SourceSpec(str(source))), str(dest), options, workers=args.workers)

    rows.append((f"writer -> local ({args.workers} threads)", best_of(args.repeat, writer_local), n))

    if not args.no_flow:
        os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
        from flows.shard import dino_shard

        tiny = work / "tiny"
        shutil.copytree(source / sorted(os.listdir(source))[0], tiny / "c", dirs_exist_ok=True)
        # start the ephemeral server
        dino_shard(str(tiny), str(work / "tiny-out"), shards={"name": "warm", "shard_size": 1000})

        for runner in [r.strip() for r in args.runners.split(",") if r.strip()]:
            cluster = None
            task_runner, label = runner, f"{runner}, parallelism {args.workers}"
            if runner == "dask":
                from infra.services import start_dask_cluster

                cluster = start_dask_cluster(work / "dask", workers=args.workers)
                task_runner, label = cluster.address, f"dask, {args.workers} workers"

            def flow_local():
                dest = work / "flow"
                shutil.rmtree(dest, ignore_errors=True)
                dino_shard(str(source), str(dest), shards={"name": "bench", "shard_size": args.shard_size},
                           runner={"parallelism": args.workers, "task_runner": task_runner})

            try:
                rows.append((f"flow -> local ({label})", best_of(args.repeat, flow_local), n))
            finally:
                if cluster is not None:
                    cluster.stop()

    if not args.no_s3:
        from dino_model.storage import S3Store
        from infra.services import start_seaweedfs

        server = start_seaweedfs(work / "seaweedfs")
        try:
            os.environ.update(server.env())
            S3Store("s3://bench").ensure_bucket()
            counter = iter(range(1000))

            def writer_s3():
                write_dataset(scan_source(SourceSpec(str(source))), f"s3://bench/run{next(counter)}", options,
                              workers=args.workers)

            rows.append((f"writer -> SeaweedFS ({args.workers} threads)", best_of(args.repeat, writer_s3), n))
        finally:
            server.stop()

    import numpy as np
    import webdataset as wds

    urls = sorted(str(p) for p in (work / "local").glob("bench-*.tar"))

    def read_back():
        count = 0
        ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("jpg", "cls")
        for img, _ in ds:
            np.asarray(img.convert("RGB"))
            count += 1
        assert count == n, (count, n)

    rows.append(("read (webdataset + PIL, 1 process)", best_of(args.repeat, read_back), n))

    tar_s = rows[0][1]
    print(f"\nsource: {source} ({n} images, {mb:.1f} MB); machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{'method':<42} {'seconds':>8} {'images/s':>10} {'MB/s':>8} {'x tar':>7}")
    for name, seconds, count in rows:
        print(f"{name:<42} {seconds:8.2f} {count / seconds:10.0f} {mb / seconds:8.1f} {seconds / tar_s:7.2f}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
