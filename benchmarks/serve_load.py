"""Does ``explainer serve`` stay up and correct under load and abuse? A bounded load test on loopback.

    python -m benchmarks.serve_load [--valid 96] [--hostile 45] [--clients 12] [--workers auto]

Starts the real service (``python -m explainer.serve``, with a token, a small queue so that overload
really happens, and a 30 s time limit) on a free loopback port, then sends, from ``--clients``
concurrent clients, a shuffled mix of

* valid requests: /v1/classify and /v1/explain (Grad-CAM, gradient, guided backprop, occlusion at
  stride 32, RISE with 100 masks) on four sample images, as uploads and as base64 JSON. Each answer
  is compared with the library called directly in this process (``net.top_k``, the registry's
  methods): predictions equal, maps equal to the library's float32 maps rounded to float16 (occlusion
  within 2^-10 relative: its 'auto' incremental path varies by about 1e-6 between calls);
* hostile requests: no token, a wrong token, a body over the limit (also without Content-Length),
  corrupt, truncated and empty images, an image bomb's header, an unknown method, class, option and
  value, an option naming a server file, and explanations that exceed their time limit (RISE with
  10000 masks, asking for a 3 s limit with ``X-Time-Limit``: 503, and the work is cancelled). Each must
  get its expected 4xx/503, never a 500.

Any request answered 503 with Retry-After (the queue was full, or its time limit passed before it got a
worker) is sent again after about its Retry-After (randomised 0.5-1.5x), until the run's deadline;
such refusals are counted.

The server's resident memory is sampled every 0.25 s (``/proc/PID/status``: VmRSS, and VmHWM, the
peak); the run is bounded to ``--max-seconds`` (120). Latency percentiles are of the valid requests'
final answers (retries included), per endpoint. Writes ``benchmarks/results/serve_load.json`` and
``serve_load.md``.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).with_name("results")
TOKEN = "load-test-token-0123456789"
TIME_LIMIT = 30.0
MAX_BODY = 4 << 20
EXPLAIN = {"gradcam": {}, "gradient": {}, "guided_backprop": {}, "occlusion": {"stride": 32},
           "rise": {"num_masks": 100, "grid_size": 5}}


def images() -> dict[str, tuple[bytes, np.ndarray]]:
    """Four sample photos as uploads: name → (file bytes, what they decode to)."""
    from PIL import Image

    import explainer

    out = {}
    for name, fmt in (("chelsea", "PNG"), ("coffee", "JPEG"), ("astronaut", "JPEG"), ("flower", "PNG")):
        buffer = io.BytesIO()
        Image.fromarray(explainer.sample_image(name)).save(buffer, format=fmt)
        data = buffer.getvalue()
        with Image.open(io.BytesIO(data)) as img:
            out[name] = (data, np.asarray(img.convert("RGB")))
    return out


def truth(net, photos) -> dict:
    """The library's answers, computed directly: top-5 per image, one map per (image, method)."""
    from explainer.methods.registry import get_method

    top = {name: [p._asdict() for p in net.top_k(pixels, 5)] for name, (_, pixels) in photos.items()}
    for name, (_, pixels) in photos.items():  # once untimed: the first gradient call converts the model
        get_method("gradient")(net, pixels, top[name][0]["index"])
        break
    maps, seconds = {}, {}
    for name, (_, pixels) in photos.items():
        label = top[name][0]["index"]
        for method, options in EXPLAIN.items():
            declared = get_method(method).options
            extra = {k: v for k, v in (("random_state", 0), ("verbose", False)) if k in declared}
            start = time.perf_counter()
            maps[name, method] = get_method(method)(net, pixels, label, **options, **extra)
            seconds.setdefault(method, []).append(time.perf_counter() - start)
    return {"top": top, "maps": maps, "seconds": {m: float(np.median(v)) for m, v in seconds.items()}}


def bomb_png(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def valid_requests(photos, n: int, rng: random.Random) -> list[dict]:
    out = []
    for i in range(n):
        name = rng.choice(list(photos))
        as_json = i % 2 == 1
        if i % 3 == 0:
            out.append({"kind": "valid", "endpoint": "classify", "image": name, "as_json": as_json})
        else:
            method = list(EXPLAIN)[i % len(EXPLAIN)]
            out.append({"kind": "valid", "endpoint": "explain", "image": name, "method": method, "as_json": as_json})
    return out


def hostile_requests(photos, n: int) -> list[dict]:
    png = photos["chelsea"][0]
    b64 = base64.b64encode(png).decode()
    big = os.urandom(MAX_BODY + 1024)
    cases = [
        ("no token", dict(path="/v1/model", method="GET", auth=False), 401),
        ("wrong token", dict(path="/v1/classify", files=png, auth="not-the-token-123"), 401),
        ("body over the limit", dict(path="/v1/classify", files=big), 413),
        ("body over the limit, chunked", dict(path="/v1/classify", chunked=big), 413),
        ("corrupt image", dict(path="/v1/classify", files=b"\x89PNG\r\n\x1a\n" + os.urandom(2000)), 422),
        ("truncated image", dict(path="/v1/explain", files=png[: len(png) // 2]), 422),
        ("empty image", dict(path="/v1/classify", files=b""), 422),
        ("image bomb header", dict(path="/v1/explain", files=bomb_png(60_000, 60_000)), 413),
        ("not base64", dict(path="/v1/explain", json={"image": "%%%"}), 422),
        ("unknown method", dict(path="/v1/explain", json={"image": b64, "methods": ["gradcan"]}), 422),
        ("unknown class", dict(path="/v1/explain", json={"image": b64, "labels": ["tabbby"]}), 422),
        ("unknown option", dict(path="/v1/explain", json={"image": b64, "methods": ["rise"],
                                                          "options": {"rise": {"num_mask": 5}}}), 422),
        ("bad option value", dict(path="/v1/explain", json={"image": b64, "methods": ["occlusion"],
                                                            "options": {"occlusion": {"stride": 0}}}), 422),
        ("option naming a file", dict(path="/v1/explain", json={
            "image": b64, "methods": ["integrated_gradients"],
            "options": {"integrated_gradients": {"baseline": "/etc/passwd"}}}), 422),
        ("over its time limit (X-Time-Limit: 3)", dict(path="/v1/explain", time_limit=3, json={
            "image": b64, "methods": ["rise"], "options": {"rise": {"num_masks": 10000}}}), 503),
    ]
    out = []
    for i in range(n):
        what, request, status = cases[i % len(cases)]
        kind = "TimeLimitExceeded" if status == 503 else None
        out.append({"kind": "hostile", "what": what, "expect": status, "expect_type": kind, **request})
    return out


async def send(client, base: str, request: dict, photos):
    headers = {}
    auth = request.get("auth", True)
    if auth:
        headers["Authorization"] = f"Bearer {TOKEN if auth is True else auth}"
    if "time_limit" in request:
        headers["X-Time-Limit"] = str(request["time_limit"])
    if request["kind"] == "valid":
        data, _ = photos[request["image"]]
        fields = {"k": 5} if request["endpoint"] == "classify" else {
            "methods": [request["method"]], "labels": "top1", "outputs": ["maps"],
            "options": {request["method"]: EXPLAIN[request["method"]]}}
        url = f"{base}/v1/{request['endpoint']}"
        if request["as_json"]:
            return await client.post(url, json={"image": base64.b64encode(data).decode(), **fields}, headers=headers)
        form = {k: (json.dumps(v) if isinstance(v, dict) else ",".join(v) if isinstance(v, list) else str(v))
                for k, v in fields.items()}
        return await client.post(url, files={"image": ("image", data)}, data=form, headers=headers)
    url = base + request["path"]
    if request.get("method") == "GET":
        return await client.get(url, headers=headers)
    if "files" in request:
        return await client.post(url, files={"image": ("image", request["files"])}, headers=headers)
    if "chunked" in request:
        body = request["chunked"]

        async def chunks():
            for i in range(0, len(body), 1 << 16):
                yield body[i:i + (1 << 16)]

        return await client.post(url, content=chunks(), headers={**headers, "content-type": "image/png"})
    return await client.post(url, json=request["json"], headers=headers)


def check(request: dict, response, answers) -> str:
    """'' when the answer is right, else what is wrong."""
    if request["kind"] == "hostile":
        if response.status_code != request["expect"]:
            return f"status {response.status_code}, expected {request['expect']}: {response.text[:200]}"
        error = response.json().get("error", {})
        if request.get("expect_type") and error.get("type") != request["expect_type"]:
            return f"error {error.get('type')}, expected {request['expect_type']}"
        return "" if error.get("message") and error.get("status") == request["expect"] else "no typed error body"
    if response.status_code != 200:
        return f"status {response.status_code}: {response.text[:200]}"
    body = response.json()
    top = answers["top"][request["image"]]
    if request["endpoint"] == "classify":
        return "" if body["predictions"] == top else "predictions differ from net.top_k"
    entry = body["maps"][0]
    if entry["label"]["index"] != top[0]["index"]:
        return "explained another class"
    served = np.frombuffer(base64.b64decode(entry["data"]), "<f2").reshape(entry["shape"])
    expected = answers["maps"][request["image"], request["method"]]
    if request["method"] == "occlusion":
        ok = np.allclose(served.astype(np.float32), expected, rtol=2 ** -10, atol=1e-5)
    else:
        ok = np.array_equal(served, expected.astype(np.float16))
    return "" if ok else f"{request['method']} map differs from the library's"


async def client_loop(queue: asyncio.Queue, base: str, photos, answers, records: list, deadline: float):
    import httpx

    async with httpx.AsyncClient(timeout=TIME_LIMIT + 30) as client:
        while not queue.empty() and time.monotonic() < deadline:
            request = queue.get_nowait()
            start, refused = time.monotonic(), 0
            while True:
                try:
                    response = await send(client, base, request, photos)
                except httpx.HTTPError as exc:
                    records.append({**_summary(request), "status": None, "error": f"{type(exc).__name__}: {exc}",
                                    "seconds": time.monotonic() - start, "refused": refused})
                    break
                if busy(response) and time.monotonic() < deadline:  # queue full: wait as told, retry
                    refused += 1
                    await asyncio.sleep(float(response.headers.get("retry-after", "1")) * (0.5 + random.random()))
                    continue
                records.append({**_summary(request), "status": response.status_code,
                                "retry_after": response.headers.get("retry-after"),
                                "problem": check(request, response, answers),
                                "seconds": time.monotonic() - start, "refused": refused})
                break


def busy(response) -> bool:
    """A 503 with Retry-After: the queue was full, or the time limit passed before the request got a
    worker (not: its work ran past the limit)."""
    return response.status_code == 503 and "retry-after" in response.headers


def _summary(request: dict) -> dict:
    keys = ("kind", "endpoint", "image", "method", "as_json", "what", "expect", "expect_type")
    return {k: request[k] for k in keys if k in request}


class Memory:
    """Samples the server's resident memory (VmRSS) and reads its peak (VmHWM)."""

    def __init__(self, pid: int):
        self.pid, self.samples = pid, []

    def read(self, key: str) -> float:
        text = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) / 1024

    async def sample(self, stop: asyncio.Event):
        while not stop.is_set():
            self.samples.append((time.monotonic(), self.read("VmRSS")))
            await asyncio.sleep(0.25)


def percentiles(values) -> dict:
    if not values:
        return {}
    v = np.asarray(values)
    return {"n": len(v), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
            "p99": float(np.percentile(v, 99)), "max": float(v.max())}


async def alone(base: str, photos, answers, repeats: int = 3) -> dict:
    """Median seconds of each kind of valid request sent alone (one client, an idle server): the
    service's own overhead over the library (decode, HTTP, JSON, float16 and base64)."""
    import httpx

    out = {}
    async with httpx.AsyncClient(timeout=TIME_LIMIT + 30) as client:
        for kind in ["classify", *EXPLAIN]:
            request = {"kind": "valid", "endpoint": "classify" if kind == "classify" else "explain",
                       "image": "chelsea", "as_json": False, **({} if kind == "classify" else {"method": kind})}
            times = []
            for _ in range(repeats):
                start = time.monotonic()
                response = await send(client, base, request, photos)
                times.append(time.monotonic() - start)
                assert not check(request, response, answers), check(request, response, answers)
            out[kind] = float(np.median(times))
    return out


async def load(args, base: str, pid: int, photos, answers) -> dict:
    rng = random.Random(0)
    requests = valid_requests(photos, args.valid, rng) + hostile_requests(photos, args.hostile)
    rng.shuffle(requests)
    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    memory, stop, records = Memory(pid), asyncio.Event(), []
    rss_idle = memory.read("VmRSS")
    sampler = asyncio.create_task(memory.sample(stop))
    start = time.monotonic()
    deadline = start + args.max_seconds
    await asyncio.gather(*(client_loop(queue, base, photos, answers, records, deadline) for _ in range(args.clients)))
    elapsed = time.monotonic() - start
    stop.set()
    await sampler
    samples = [rss for _, rss in memory.samples]
    half = len(samples) // 2
    return {"records": records, "seconds": elapsed, "sent": len(records), "planned": len(requests),
            "rss_idle_mb": rss_idle, "rss_peak_mb": memory.read("VmHWM"),
            "rss_max_first_half_mb": max(samples[:half] or [0]), "rss_max_second_half_mb": max(samples[half:] or [0]),
            "rss_end_mb": memory.read("VmRSS")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> dict:
    import httpx
    import onnxruntime

    import explainer

    photos = images()
    net = explainer.load()
    t = time.monotonic()
    answers = truth(net, photos)
    truth_seconds = time.monotonic() - t
    port = _free_port()
    command = [sys.executable, "-m", "explainer.serve", "--port", str(port), "--workers", str(args.workers),
               "--queue", str(args.queue), "--time-limit", str(TIME_LIMIT), "--max-body-bytes", str(MAX_BODY),
               "--log-level", "warning"]
    log_path = RESULTS / "serve_load.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log,
                                  env={**os.environ, "EXPLAINER_SERVE_TOKEN": TOKEN})
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            health = httpx.get(base + "/healthz").json()
            idle = asyncio.run(alone(base, photos, answers))
            result = asyncio.run(load(args, base, server.pid, photos, answers))
            result["pool"] = httpx.get(base + "/healthz").json()["pool"]
            result["alone_seconds"] = idle
            result["workers"], result["capacity"] = health["pool"]["workers"], health["pool"]["capacity"]
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    lines = log_path.read_text().splitlines()
    access = [json.loads(line) for line in lines if '"event": "access"' in line]
    result["server_errors"] = [line[:3000] for line in lines if '"level": "error"' in line][:3]
    log_path.unlink()
    result.update(access_log_lines=len(access), truth_seconds=truth_seconds, library_seconds=answers["seconds"],
                  access_log_500=sum(a["status"] >= 500 and a["status"] != 503 for a in access))
    from .run import cpu_model

    result["meta"] = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=cpu_model(),
                          cpus=os.cpu_count(), python=platform.python_version(), onnxruntime=onnxruntime.__version__,
                          model=net.name, clients=args.clients, time_limit=TIME_LIMIT, max_body_bytes=MAX_BODY)
    return result


def summarise(result: dict) -> dict:
    records = result["records"]
    valid = [r for r in records if r["kind"] == "valid"]
    hostile = [r for r in records if r["kind"] == "hostile"]
    statuses: dict = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    by_what: dict = {}
    for r in hostile:
        entry = by_what.setdefault(r["what"], {"sent": 0, "as_expected": 0, "expected": r["expect"]})
        entry["sent"] += 1
        entry["as_expected"] += not r.get("problem", "no answer")
    answered = [r for r in valid if r["status"] == 200]
    return {
        "valid": {"sent": len(valid), "correct": sum(r["status"] == 200 and not r.get("problem") for r in valid),
                  "wrong": [r for r in valid if r.get("problem") or r["status"] != 200],
                  "refused_then_retried": sum(r["refused"] for r in valid)},
        "hostile": {"sent": len(hostile), "as_expected": sum(not r.get("problem", "no answer") for r in hostile),
                    "by_kind": by_what,
                    "wrong": [r for r in hostile if r.get("problem", "no answer")]},
        "status_counts": statuses, "server_errors_500": sum(r["status"] == 500 for r in records),
        "connection_errors": sum(r["status"] is None for r in records),
        "latency_s": {"classify": percentiles([r["seconds"] for r in answered if r["endpoint"] == "classify"]),
                      "explain": percentiles([r["seconds"] for r in answered if r["endpoint"] == "explain"]),
                      "hostile": percentiles([r["seconds"] for r in hostile])},
        "explain_by_method": {m: percentiles([r["seconds"] for r in answered if r.get("method") == m]) for m in EXPLAIN},
    }


def markdown(result: dict, summary: dict) -> str:
    meta, v, h = result["meta"], summary["valid"], summary["hostile"]
    lat = summary["latency_s"]

    def row(name, p, *alone):
        cells = [p.get(k, 0) for k in ("p50", "p90", "p99", "max")]
        return (f"| {name} | {p.get('n', 0)} | " + " | ".join(f"{c:.2f}" for c in cells) + " | "
                + " | ".join("" if a is None else f"{a:.2f}" for a in alone) + " |")

    lines = [
        "# `explainer serve` under load and abuse", "",
        f"{meta['date']}, {meta['machine']}, {meta['cpus']} CPUs, onnxruntime {meta['onnxruntime']}, model "
        f"{meta['model']}; server: {result['workers']} workers, {result['capacity']} requests held at most "
        f"(running + queued), time limit {meta['time_limit']:g} s, body limit {meta['max_body_bytes'] >> 20} MiB, "
        f"token required; {meta['clients']} concurrent clients on loopback; {result['sent']} of {result['planned']} "
        f"planned requests sent in {result['seconds']:.1f} s (`python -m benchmarks.serve_load`).", "",
        f"* **Valid requests: {v['correct']} of {v['sent']} answered correctly** (predictions equal to `net.top_k`, "
        f"maps equal to the library's, rounded to float16); {v['refused_then_retried']} times a valid request got "
        "503 with Retry-After while the queue was full, and was answered on retry (hostile ones are retried "
        "the same way until they reach their expected answer).",
        f"* **Hostile requests: {h['as_expected']} of {h['sent']} got their expected status** with the library's "
        "typed error message.",
        f"* **500s: {summary['server_errors_500']}** (client side); the server's access log has "
        f"{result['access_log_lines']} lines, {result['access_log_500']} with a 5xx other than 503; connection errors: "
        f"{summary['connection_errors']}.",
        f"* **Memory** (server RSS): {result['rss_idle_mb']:.0f} MB idle once warm (after the requests sent alone), peak "
        f"{result['rss_peak_mb']:.0f} MB (VmHWM); highest sample in the first half of the run "
        f"{result['rss_max_first_half_mb']:.0f} MB, in the second {result['rss_max_second_half_mb']:.0f} MB; "
        f"{result['rss_end_mb']:.0f} MB at the end.",
        f"* Pool at the end: {result['pool']}.", "",
        "Latency in seconds under load, from the first send to the final answer (queueing and retries after "
        "503 included, so it mostly measures the wait behind the other clients' work); then the median of "
        "the same request sent alone to the idle server (chelsea, 3 times), and of the library called "
        "directly in the benchmark's process (the four images):", "",
        "| requests | n | p50 | p90 | p99 | max | alone, served | alone, library |", "|---|---|---|---|---|---|---|---|",
        row("classify", lat["classify"], result["alone_seconds"]["classify"], None),
        row("explain (all methods)", lat["explain"], None, None),
        *[row(f"explain: {m}", p, result["alone_seconds"].get(m), result["library_seconds"].get(m))
          for m, p in summary["explain_by_method"].items() if p],
        row("hostile (all kinds)", lat["hostile"]), "",
        "| hostile request | sent | expected status | as expected |", "|---|---|---|---|",
        *[f"| {what} | {e['sent']} | {e['expected']} | {e['as_expected']} |" for what, e in h["by_kind"].items()], "",
        "Status counts: " + ", ".join(f"{k}: {n}" for k, n in sorted(summary["status_counts"].items())) + ".",
    ]
    for label, wrong in (("valid", v["wrong"]), ("hostile", h["wrong"])):
        for r in wrong[:10]:
            lines.append(f"* wrong ({label}): {r}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--valid", type=int, default=96)
    parser.add_argument("--hostile", type=int, default=45)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--workers", default="auto")
    parser.add_argument("--queue", default="4")
    parser.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args(argv)
    result = run(args)
    summary = summarise(result)
    RESULTS.mkdir(exist_ok=True)
    payload = {k: v for k, v in result.items() if k != "records"}
    payload["summary"] = summary
    (RESULTS / "serve_load.json").write_text(json.dumps(payload, indent=1, default=str))
    text = markdown(result, summary)
    (RESULTS / "serve_load.md").write_text(text)
    print(text)
    ok = summary["valid"]["correct"] == summary["valid"]["sent"] and summary["server_errors_500"] == 0 \
        and summary["hostile"]["as_expected"] == summary["hostile"]["sent"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
