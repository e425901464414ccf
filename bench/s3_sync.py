"""Sync throughput of `visionft.storage` against a local S3 server, beside plain boto3 in the same run.

Two data sets: many small files (default 1,000 x 100 KiB) and one large file (default 1 GiB). For each,
four ways to move it up and back down, all against the same server:

* visionft: `upload_folder` / `download_prefix` (bounded thread pool; sha256 manifest; resumable parts);
* boto3 loop: `upload_file` / `download_file` with the default TransferConfig, one file after the other
  (the brief's "aws s3 sync"-equivalent baseline);
* boto3 manager: one s3transfer TransferManager with the default TransferConfig (10 threads), all files
  submitted at once, which is closest to what `aws s3 sync` itself does.

Also timed: a second visionft download of the same prefix (everything unchanged, nothing transferred).

Usage:
    .venv/bin/python bench/s3_sync.py                       # starts SeaweedFS from the test harness
    .venv/bin/python bench/s3_sync.py --large-mb 256 --small-count 1000
    .venv/bin/python bench/s3_sync.py --endpoint http://127.0.0.1:9000   # a running server; keys from env

MB is 10^6 bytes. Runs on loopback measure the client and the server together, on the same CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for tests.harness when run as a script

from boto3.s3.transfer import TransferConfig, create_transfer_manager  # noqa: E402
from visionft.storage import StorageSettings, download_prefix, make_client, upload_folder  # noqa: E402


def make_data(root: Path, small_count: int, small_kib: int, large_mb: int) -> tuple[Path, Path]:
    small, large = root / "small", root / "large"
    small.mkdir(parents=True)
    large.mkdir(parents=True)
    for i in range(small_count):
        (small / f"{i // 100:02d}" / f"f{i:05d}.bin").parent.mkdir(exist_ok=True)
        (small / f"{i // 100:02d}" / f"f{i:05d}.bin").write_bytes(os.urandom(small_kib * 1024))
    block = os.urandom(16 * 1024 * 1024)
    with (large / "model.bin").open("wb") as handle:
        written = 0
        while written < large_mb * 1024 * 1024:
            # Vary each block so no layer can deduplicate or compress the file.
            chunk = os.urandom(64) + block[64 : min(len(block), large_mb * 1024 * 1024 - written)]
            handle.write(chunk)
            written += len(chunk)
    return small, large


def files_of(folder: Path) -> list[tuple[Path, str]]:
    return [(p, p.relative_to(folder).as_posix()) for p in sorted(folder.rglob("*")) if p.is_file()]


def timed(fn: Callable[[], Any]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def boto3_loop_up(client: Any, folder: Path, bucket: str, prefix: str) -> None:
    for path, rel in files_of(folder):
        client.upload_file(str(path), bucket, prefix + rel)


def boto3_loop_down(client: Any, folder: Path, bucket: str, prefix: str, dest: Path) -> None:
    for _, rel in files_of(folder):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, prefix + rel, str(target))


def manager_up(client: Any, folder: Path, bucket: str, prefix: str) -> None:
    with create_transfer_manager(client, TransferConfig()) as manager:
        futures = [manager.upload(str(p), bucket, prefix + rel) for p, rel in files_of(folder)]
        for future in futures:
            future.result()


def manager_down(client: Any, folder: Path, bucket: str, prefix: str, dest: Path) -> None:
    with create_transfer_manager(client, TransferConfig()) as manager:
        futures = []
        for _, rel in files_of(folder):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            futures.append(manager.download(bucket, prefix + rel, str(dest / rel)))
        for future in futures:
            future.result()


def bench_data_set(client: Any, bucket: str, name: str, folder: Path, out: Path) -> list[dict[str, Any]]:
    """Time every method on one data set, up then down, into fresh prefixes and folders."""
    size = sum(p.stat().st_size for p, _ in files_of(folder))
    tag = folder.name
    rows: list[dict[str, Any]] = []

    def row(method: str, direction: str, fn: Callable[[], Any], moved: int = size) -> None:
        seconds = timed(fn)
        rate = round(moved / 1e6 / seconds, 1) if moved else 0.0
        rows.append(
            {
                "data": name,
                "method": method,
                "direction": direction,
                "seconds": round(seconds, 2),
                "MB_per_s": rate,
            }
        )
        print(f"{name:>20}  {method:<14} {direction:<15} {seconds:8.2f} s {rate:8.1f} MB/s", flush=True)

    vft_uri, vft_dir = f"s3://{bucket}/vft/{tag}/", out / f"vft-{tag}"
    row("visionft", "upload", lambda: upload_folder(folder, vft_uri, client=client))
    row("visionft", "download", lambda: download_prefix(vft_uri, vft_dir, client=client))
    row("visionft", "download again", lambda: download_prefix(vft_uri, vft_dir, client=client), moved=0)
    shutil.rmtree(vft_dir)
    row("boto3 loop", "upload", lambda: boto3_loop_up(client, folder, bucket, f"loop/{tag}/"))
    row(
        "boto3 loop",
        "download",
        lambda: boto3_loop_down(client, folder, bucket, f"loop/{tag}/", out / f"loop-{tag}"),
    )
    shutil.rmtree(out / f"loop-{tag}")
    row("boto3 manager", "upload", lambda: manager_up(client, folder, bucket, f"mgr/{tag}/"))
    row(
        "boto3 manager",
        "download",
        lambda: manager_down(client, folder, bucket, f"mgr/{tag}/", out / f"mgr-{tag}"),
    )
    shutil.rmtree(out / f"mgr-{tag}")
    return rows


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    server = None
    if args.endpoint is None:
        from tests.harness.s3 import SeaweedS3

        server = SeaweedS3()
        print(f"starting SeaweedFS ... {server.start():.1f} s at {server.endpoint_url}", flush=True)
        os.environ.update(server.env())
    else:
        os.environ["AWS_ENDPOINT_URL_S3"] = args.endpoint
    work = Path(tempfile.mkdtemp(prefix="visionft-bench-", dir=args.work_dir))
    rows: list[dict[str, Any]] = []
    try:
        settings = StorageSettings.from_env()
        client = make_client(settings, max_pool_connections=32)
        bucket = f"bench-{int(time.time())}"
        client.create_bucket(Bucket=bucket)
        began = time.perf_counter()
        small, large = make_data(work / "data", args.small_count, args.small_kib, args.large_mb)
        print(f"made data in {time.perf_counter() - began:.1f} s", flush=True)
        # Warm-up: SeaweedFS allocates volumes on the first writes to a bucket; keep that out of the timings.
        for i in range(20):
            client.put_object(Bucket=bucket, Key=f"warmup/{i}", Body=os.urandom(1024))
        for name, folder in (
            (f"{args.small_count} x {args.small_kib} KiB", small),
            (f"1 x {args.large_mb} MiB", large),
        ):
            rows.extend(bench_data_set(client, bucket, name, folder, work / "out"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if server is not None:
            server.cleanup()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-count", type=int, default=1000, help="number of small files (default 1000)")
    parser.add_argument(
        "--small-kib", type=int, default=100, help="size of each small file in KiB (default 100)"
    )
    parser.add_argument(
        "--large-mb", type=int, default=1024, help="size of the large file in MiB (default 1024)"
    )
    parser.add_argument("--endpoint", help="use a running S3 server (credentials from the environment)")
    parser.add_argument("--work-dir", help="where to put the data (default: the system temp folder)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = run(args)
    print(
        f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print("\n| data | method | direction | seconds | MB/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['method']} | {r['direction']} | {r['seconds']} | {r['MB_per_s']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
