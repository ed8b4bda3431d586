"""Overload and fault benchmark: one replica offered 1x, 3x and 10x its capacity, a SIGKILLed replica, autoscaling.

    python benchmarks/serve_overload.py --out overload.md     # ~5 min, loopback only, stops by itself
    RAY_SERVE_ENABLE_HA_PROXY=1 python benchmarks/serve_overload.py --out overload_haproxy.md   # Ray's HAProxy ingress

The app of ``configs/serve.yaml`` (its overload settings: bounded queue, 503 with Retry-After, time-outs) on a local
Ray with 2 CPUs, model ``--model`` or an untrained export (speed does not depend on the weights):

1. **Capacity** of one replica: ``max_ongoing_requests`` clients back to back for ``--capacity-seconds``.
2. **Offered load** at 1x, 3x and 10x that capacity, open loop (requests sent at a constant rate whatever the answers,
   as independent users do), ``--seconds`` each: share answered 200, share 503, client time-outs, p50/p99 of the 200s
   (latency from the moment a request was due, so a slow sender cannot hide queueing), and /healthz after.
3. **Replica kill** under 1x load: SIGKILL the only replica; what the requests in flight got, and when requests are
   answered again.
4. **Autoscaling** (min 1, max 2 replicas): sustained 3x load until a second replica runs, then SIGKILL one of the two:
   what the requests in flight got (Serve retries them on the other replica).

Each request is one real CelebA face (raw JPEG body), sent by a minimal asyncio HTTP/1.1 client over keep-alive
connections: it costs far less CPU than httpx, which matters when the load generator shares 2 cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from label_throughput import model_to_benchmark
from serve_load import free_port

from genderrec import serving

HOST = "127.0.0.1"  # loopback only
REPO = Path(__file__).resolve().parents[1]
CLIENT_TIMEOUT_S = 60.0
LEVELS = (1, 3, 10)


class Client:
    """``POST /v1/predict`` over keep-alive HTTP/1.1 connections, reused as httpx's or a browser's pool would."""

    def __init__(self, port: int):
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, body: bytes, timeout: float = CLIENT_TIMEOUT_S) -> int | str:
        """The answer's status, or the name of what went wrong ('client timeout', a connection error)."""
        head = (
            f"POST /v1/predict HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        writer = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection(HOST, self.port)
                writer.write(head + body)
                status = int((await reader.readline()).split()[1])
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip().lower()
                if headers.get("transfer-encoding") == "chunked":  # Serve's own 503 and 408
                    while size := int((await reader.readline()).split(b";")[0], 16):
                        await reader.readexactly(size + 2)
                    await reader.readline()
                else:
                    await reader.readexactly(int(headers.get("content-length", 0)))
        except TimeoutError:
            status = "client timeout"
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
            status = type(exc).__name__
        if isinstance(status, int) and headers.get("connection") != "close":
            self.idle.append((reader, writer))
        elif writer is not None:
            writer.close()
        return status


async def closed_loop(port: int, bodies: list[bytes], clients: int, seconds: float) -> float:
    """Requests/s answered 200 by ``clients`` that each send the next request when the last is answered."""
    deadline = time.perf_counter() + seconds
    answered, connections = 0, Client(port)

    async def client(number: int):
        nonlocal answered
        while time.perf_counter() < deadline:
            status = await connections.post(bodies[number % len(bodies)])  # (not `answered += await ...`: it
            answered += status == 200  # would read `answered` before the await and lose the others' answers)

    started = time.perf_counter()
    await asyncio.gather(*(client(number) for number in range(clients)))
    return answered / (time.perf_counter() - started)


async def open_loop(port: int, bodies: list[bytes], rate: float, seconds: float, on_tick=None) -> list[tuple]:
    """Send at ``rate`` per second for ``seconds`` (at most rate x seconds requests) whatever the answers; returns
    (due time, status, seconds from due to answer, seconds the sending started late) each. ``on_tick(elapsed)`` runs every second (kills, probes)."""
    count = int(rate * seconds)
    started = time.perf_counter()
    results, tasks, connections = [], [], Client(port)

    async def one(number: int, due: float):
        lag = time.perf_counter() - due  # how late the load generator itself was (it shares the CPUs)
        status = await connections.post(bodies[number % len(bodies)])
        results.append((due - started, status, time.perf_counter() - due, lag))

    next_tick = 1.0
    for number in range(count):
        due = started + number / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(one(number, due)))
        if on_tick and due - started >= next_tick:
            next_tick += 1.0
            await on_tick(due - started)
    await asyncio.gather(*tasks)
    return results


def summary(results: list[tuple], seconds: float) -> dict:
    statuses = [status for _, status, *_ in results]
    ok_ms = 1000 * np.asarray([latency for _, status, latency, _ in results if status == 200])
    return {
        "sent": len(results),
        "offered_rps": len(results) / seconds,
        "answered_rps": len(ok_ms) / seconds,
        "share_200": statuses.count(200) / len(results),
        "share_503": statuses.count(503) / len(results),
        "client_timeouts": statuses.count("client timeout"),
        "other": sorted({str(status) for status in statuses} - {"200", "503"}),
        "p50_ms": float(np.percentile(ok_ms, 50)) if len(ok_ms) else float("nan"),
        "p99_ms": float(np.percentile(ok_ms, 99)) if len(ok_ms) else float("nan"),
        "p99_send_lag_ms": float(np.percentile([1000 * lag for *_, lag in results], 99)),
    }


def healthz(port: int) -> int | str:
    import httpx

    try:
        return httpx.get(f"http://{HOST}:{port}/healthz", timeout=30).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


def running_replicas() -> list[int]:
    """PIDs of the replicas Serve reports RUNNING (from Ray's actor table: the benchmark's Ray has no dashboard)."""
    from ray import serve
    from ray._private import state

    deployment = serve.status().applications["genderrec"].deployments["GenderClassifier"]
    if deployment.replica_states.get("RUNNING", 0) == 0:
        return []
    return [
        actor["Pid"]
        for actor in state.actors().values()
        if actor["State"] == "ALIVE" and actor["ActorClassName"].endswith(":GenderClassifier")
    ]


def proxies() -> list[int]:
    """PIDs of Serve's ingress (one here: ``proxy_location: HeadOnly``): its proxy actor, or with
    ``RAY_SERVE_ENABLE_HA_PROXY=1`` the HAProxyManager actor and the haproxy processes it runs."""
    from ray._private import state

    actors = [
        actor["Pid"]
        for actor in state.actors().values()
        if actor["State"] == "ALIVE" and actor["ActorClassName"].endswith(("ProxyActor", "HAProxyManager"))
    ]
    return actors + [child for pid in actors for child in children(pid)]


def children(pid: int) -> list[int]:
    """PIDs of the processes ``pid`` started (from /proc/<pid>/task/*/children), and theirs."""
    found = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in map(int, listing.read_text().split()):
                found += [child, *children(child)]
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU seconds the processes have used so far (from /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):  # the process ended meanwhile
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / os.sysconf("SC_CLK_TCK")


def offered(port, bodies, rate: float, seconds: float) -> dict:
    """One offered load: its summary, /healthz after it, and the CPU that Serve's proxy, the replica and this load
    generator used meanwhile (the proxy's per request is what receiving, routing and refusing costs)."""
    watched = {"proxy": proxies(), "replica": running_replicas()}
    before = {name: cpu_seconds(pids) for name, pids in watched.items()}
    client_before, started = time.process_time(), time.perf_counter()
    results = asyncio.run(open_loop(port, bodies, rate, seconds))
    elapsed = time.perf_counter() - started
    cpu = {name: cpu_seconds(pids) - before[name] for name, pids in watched.items()}
    cpu["client"] = time.process_time() - client_before
    return {
        **summary(results, seconds),
        "healthz": healthz(port),
        **{f"{name}_cores": used / elapsed for name, used in cpu.items()},
        "proxy_ms_per_request": 1000 * cpu["proxy"] / len(results),
    }


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (from /proc): the benchmark, its Ray's daemons, workers, proxy, replicas."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += parents.get(pid, [])
    return found


def pin(replica_cores: set[int] | None) -> None:
    """Give the replica ``replica_cores`` and everything else of this benchmark (load generator, proxy, Ray) the
    other cores; ``None`` gives every process every core again."""
    every = set(range(os.cpu_count()))
    replicas = set(running_replicas())
    for pid in descendants(os.getpid()):
        cores = every if replica_cores is None else replica_cores if pid in replicas else every - replica_cores
        with contextlib.suppress(OSError):  # the process ended meanwhile
            os.sched_setaffinity(pid, cores)


def deploy(model_dir: str, port: int, overrides: list[str]) -> None:
    config = str(REPO / "configs" / "serve.yaml")
    serving.start(serving.settings(config, ["num_gpus=0", *overrides], model=model_dir, host=HOST, port=port))


async def kill_under_load(port, bodies, rate, seconds, replicas_after: int) -> dict:
    """SIGKILL one replica 3 s into a load at ``rate``: what the requests due around the kill got, when requests are
    answered again and when ``replicas_after`` replicas run again."""
    victim = running_replicas()[0]
    marks: dict[str, float] = {}

    async def on_tick(elapsed):
        if "kill" not in marks and elapsed >= 3:
            os.kill(victim, signal.SIGKILL)
            marks["kill"] = elapsed
        elif "kill" in marks and "replaced" not in marks:
            pids = await asyncio.to_thread(running_replicas)
            if len(pids) >= replicas_after and victim not in pids:
                marks["replaced"] = elapsed

    results = await open_loop(port, bodies, rate, seconds, on_tick)
    kill = marks["kill"]
    in_flight = [(status, latency) for due, status, latency, _ in results if kill - 1 <= due < kill]
    answered_again = min(
        (due + latency for due, status, latency, _ in results if due > kill and status == 200), default=None
    )
    return {
        "in_flight": in_flight,
        "answered_again_s": None if answered_again is None else answered_again - kill,
        "replaced_s": marks["replaced"] - kill if "replaced" in marks else None,
        "after": summary([row for row in results if row[0] > kill], seconds - kill),
        "healthz_after": healthz(port),
    }


async def scale_up(port, bodies, rate, seconds) -> float | None:
    """Seconds of sustained ``rate`` load until a second replica runs (None: not within ``seconds``)."""
    marks = {}

    async def on_tick(elapsed):
        if "second" not in marks and len(await asyncio.to_thread(running_replicas)) >= 2:
            marks["second"] = elapsed

    await open_loop(port, bodies, rate, seconds, on_tick)
    return marks.get("second")


def report(args, capacity: float, levels: dict, kill_one: dict, scale_s, kill_two: dict, load) -> str:
    def outcomes(in_flight):
        counts: dict[str, int] = {}
        for status, _ in in_flight:
            counts[str(status)] = counts.get(str(status), 0) + 1
        slowest = max((latency for _, latency in in_flight), default=float("nan"))
        return f"{counts}, slowest {slowest:.1f} s"

    app_args = serving.application(serving.read_config(str(REPO / "configs" / "serve.yaml"))).args
    overrides = dict(override.split("=", 1) for override in args.router)  # --router-backoff
    settings = serving.ServeArgs.model_validate({**app_args, **overrides})
    one_x = levels[1]["p99_ms"]
    lines = [
        f"`python benchmarks/serve_overload.py {' '.join(args.argv)}` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; "
        f"load average {load[0][0]:.1f} before, {load[1][0]:.1f} after (other jobs shared the cores).",
        "",
        f"configs/serve.yaml's limits: max_ongoing_requests {settings.max_ongoing_requests}, max_queued_requests "
        f"{settings.max_queued_requests}, retry_after_s {settings.retry_after_s:g}, request_timeout_s "
        f"{settings.request_timeout_s:g}; max_batch_size {settings.max_batch_size}. Model: {args.model_name}.",
        "",
        f"Serve's router, every replica full: looks again after {settings.router_initial_backoff_s:g} s, doubling up "
        f"to {settings.router_max_backoff_s:g} s"
        + (" (`--router-backoff`)." if args.router else " (configs/serve.yaml)."),
        "",
        f"Capacity of one replica (closed loop, {settings.max_ongoing_requests} clients): **{capacity:.1f} requests/s**.",
        "",
        *(
            [
                f"Capacity and 1x/3x/10x with the replica alone on core {os.cpu_count() - 1} and the load generator, "
                "Serve's proxy and Ray on the others (`--pin`); the kill and autoscaling runs unpinned.",
                "",
            ]
            if args.pin
            else []
        ),
        "| offered | sent | requests/s offered | answered 200 | 503 | client time-outs | other | p50 ms (200s) | "
        "p99 ms (200s) | p99 / p99 at 1x | p99 ms the client sent late | /healthz after |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for level, row in levels.items():
        lines.append(
            f"| {level}x | {row['sent']} | {row['offered_rps']:.1f} | {100 * row['share_200']:.1f} % | "
            f"{100 * row['share_503']:.1f} % | {row['client_timeouts']} | {', '.join(row['other']) or '-'} | "
            f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['p99_ms'] / one_x:.2f} | {row['p99_send_lag_ms']:.0f} | "
            f"{row['healthz']} |"
        )

    lines += [
        "",
        "CPU used during each offered load, in cores (CPU seconds per second; the machine has "
        f"{os.cpu_count()}), from /proc/<pid>/stat:",
        "",
        "| offered | answered 200/s | Serve's proxy | proxy CPU ms per request | replica | load generator |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {level}x | {row['answered_rps']:.1f} | {row['proxy_cores']:.2f} | {row['proxy_ms_per_request']:.2f} | "
            f"{row['replica_cores']:.2f} | {row['client_cores']:.2f} |"
            for level, row in levels.items()
        ),
    ]

    def seconds(value, digits=1) -> str:
        return "more than the run" if value is None else f"{value:.{digits}f} s"

    lines += [
        "",
        f"- Goal at 10x: p99 of the accepted <= 3x the p99 at 1x: {levels[10]['p99_ms'] / one_x:.2f}x "
        f"({'met' if levels[10]['p99_ms'] <= 3 * one_x else 'not met'}); client time-outs at all levels: "
        f"{sum(row['client_timeouts'] for row in levels.values())}.",
        f"- SIGKILL of the only replica under 1x load: requests due in the second before the kill got "
        f"{outcomes(kill_one['in_flight'])}; answered again {seconds(kill_one['answered_again_s'])} after the kill; "
        f"after the kill: {100 * kill_one['after']['share_200']:.0f} % 200, "
        f"{kill_one['after']['client_timeouts']} client time-outs, others {kill_one['after']['other']}; "
        f"/healthz after: {kill_one['healthz_after']}.",
        f"- Autoscaling (min 1, max 2) under 3x load: a second replica ran after {seconds(scale_s, 0)}.",
        f"- SIGKILL of one of two replicas under 1x load: requests due in the second before the kill got "
        f"{outcomes(kill_two['in_flight'])}; two replicas again after "
        f"{seconds(kill_two['replaced_s'])}; "
        f"after the kill: {100 * kill_two['after']['share_200']:.0f} % 200, "
        f"{kill_two['after']['client_timeouts']} client time-outs, p99 {kill_two['after']['p99_ms']:.0f} ms.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    import sys

    import ray
    from ray import serve

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: an untrained --architecture export)")
    parser.add_argument("--architecture", default="googlenet")
    parser.add_argument("--input-size", type=int, nargs=2, default=(48, 40), help="of the untrained export")
    parser.add_argument("--celeba-dir", default=os.environ.get("GENDERREC_CELEBA_DIR", "../shared/celeba"))
    parser.add_argument("--seconds", type=float, default=30, help="seconds per offered load (default 30)")
    parser.add_argument("--capacity-seconds", type=float, default=15)
    parser.add_argument("--kill-seconds", type=float, default=45, help="load around a kill (default 45)")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="1x/3x/10x with the replica alone on the last core and the load generator, proxy and Ray on the others",
    )
    parser.add_argument(
        "--router-backoff",
        nargs=2,
        type=float,
        metavar=("INITIAL_S", "MAX_S"),
        help="Serve's router backoff while every replica is full, instead of configs/serve.yaml's, to compare "
        "(run 6: 0.005 0.02)",
    )
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    initial, largest = args.router_backoff or (None, None)
    args.router = [f"router_initial_backoff_s={initial}", f"router_max_backoff_s={largest}"] if initial else []

    bodies = [path.read_bytes() for path in sorted((Path(args.celeba_dir) / "img_align_celeba").glob("*.jpg"))[:16]]
    port = free_port()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        model_dir = model_to_benchmark(args, Path(work))
        args.model_name = args.model or f"untrained {args.architecture} at {args.input_size[0]}x{args.input_size[1]}"
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            deploy(model_dir, port, ["autoscaling_config=null", "num_replicas=1", *args.router])
            if args.pin:
                pin({os.cpu_count() - 1})
            asyncio.run(closed_loop(port, bodies, 8, 5))  # warm-up
            clients = serving.ServeArgs(model="m").max_ongoing_requests
            capacity = asyncio.run(closed_loop(port, bodies, clients, args.capacity_seconds))
            print(f"capacity {capacity:.1f} requests/s", flush=True)
            levels = {}
            for level in LEVELS:
                levels[level] = offered(port, bodies, level * capacity, args.seconds)
                print(level, levels[level], flush=True)
            if args.pin:
                pin(None)  # replacements and new replicas start where Ray puts them
            kill_one = asyncio.run(kill_under_load(port, bodies, capacity, args.kill_seconds, 1))
            print("kill one of one", kill_one, flush=True)
            deploy(model_dir, port, ["autoscaling_config.max_replicas=2", *args.router])
            scale_s = asyncio.run(scale_up(port, bodies, 3 * capacity, args.kill_seconds))
            print("second replica after", scale_s, flush=True)
            kill_two = asyncio.run(kill_under_load(port, bodies, capacity, args.kill_seconds, 2))
            print("kill one of two", kill_two, flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    text = report(args, capacity, levels, kill_one, scale_s, kill_two, (load_before, os.getloadavg()))
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
