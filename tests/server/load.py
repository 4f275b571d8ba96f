#!/usr/bin/env python3
"""Bounded load test for `moeflux serve` (a command, not a timed test).

Starts `moeflux serve` on the bundled model (or targets --url), then runs --clients
concurrent streaming chat clients until --requests requests are done. Each request asks a
random addition problem and checks the answer. Reports requests/s, time to first token
(p50/p95, measured by the client: request sent -> first content delta), latency, and the
server's RSS before and after. Exits non-zero if any request failed or went unanswered.

    python3 tests/server/load.py                          # target/release/moeflux, 32 x 256
    python3 tests/server/load.py --bin path/to/moeflux --clients 32 --requests 512
    python3 tests/server/load.py --url http://127.0.0.1:8080 --pid 1234

Standard library only, so it runs without the test venv.
"""
import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def read_chunked(reader):
    """Yields the payload of an HTTP/1.1 chunked body."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed inside a chunked body")
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readline()
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


async def one_request(host, port, key, model, a, b, max_tokens):
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": f"{a}+{b}="}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        + (f"Authorization: Bearer {key}\r\n" if key else "")
        + "\r\n"
    ).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head + body)
        await writer.drain()
        status_line = await reader.readline()
        status = int(status_line.split()[1])
        headers = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        if status != 200:
            rest = await reader.read()
            raise RuntimeError(f"HTTP {status}: {rest[:300]!r}")
        if "chunked" not in headers.get("transfer-encoding", ""):
            raise RuntimeError(f"unexpected framing: {headers}")
        buf, text, ttft, usage, done, finish = b"", "", None, None, False, None
        async for data in read_chunked(reader):
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        continue
                    j = json.loads(payload)
                    if "error" in j:
                        raise RuntimeError(f"stream error: {j['error']}")
                    if j.get("usage"):
                        usage = j["usage"]
                    for c in j.get("choices", []):
                        piece = c.get("delta", {}).get("content")
                        if piece:
                            if ttft is None:
                                ttft = time.perf_counter() - t0
                            text += piece
                        finish = c.get("finish_reason") or finish
        if not done:
            raise RuntimeError("stream ended without [DONE]")
        return {
            "ttft": ttft if ttft is not None else time.perf_counter() - t0,
            "latency": time.perf_counter() - t0,
            "tokens": (usage or {}).get("completion_tokens", 0),
            "correct": text == str(a + b),
            "finish": finish,
        }
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except Exception:
            pass


async def run_load(host, port, key, model, clients, requests, max_tokens, seed):
    rng = random.Random(seed)
    problems = [(rng.randint(0, 9999), rng.randint(0, 9999)) for _ in range(requests)]
    results, errors = [], []
    next_i = 0

    async def worker():
        nonlocal next_i
        while next_i < requests:
            i = next_i
            next_i += 1
            a, b = problems[i]
            try:
                results.append(await asyncio.wait_for(one_request(host, port, key, model, a, b, max_tokens), 300))
            except Exception as e:  # noqa: BLE001 - every failure is reported
                errors.append(f"request {i} ({a}+{b}): {type(e).__name__}: {e}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return results, errors, time.perf_counter() - t0


def wait_ready(base, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"moeflux serve exited with {proc.returncode} during startup")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if json.load(r).get("status") == "ready":
                    return
        except Exception:
            pass
        time.sleep(0.2)
    sys.exit("server did not become ready")


def scrape(base):
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except Exception:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "moeflux"))
    ap.add_argument("--url", help="use a running server instead of starting one")
    ap.add_argument("--pid", type=int, help="with --url: the server's pid, for RSS")
    ap.add_argument("--api-key", default=os.environ.get("MOEFLUX_API_KEY", ""))
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    proc = None
    if args.url:
        base, pid = args.url.rstrip("/"), args.pid
    else:
        if not os.path.exists(args.bin):
            sys.exit(f"{args.bin} not found: cargo build --release -p moeflux (or pass --bin)")
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        env = dict(os.environ, RUST_LOG="warn")
        if args.api_key:
            env["MOEFLUX_API_KEY"] = args.api_key
        cmd = [args.bin, "serve", "--device", "cpu", "--port", str(port), "--queue-size", str(max(64, args.clients))]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        base, pid = f"http://127.0.0.1:{port}", proc.pid
    url = urllib.parse.urlparse(base)
    try:
        wait_ready(base, proc)
        rss_before = rss_mib(pid) if pid else None
        # One request first, so graph building and first-touch allocation are not in the numbers.
        asyncio.run(one_request(url.hostname, url.port, args.api_key, args.model, 1, 1, args.max_tokens))
        rss_warm = rss_mib(pid) if pid else None
        results, errors, wall = asyncio.run(
            run_load(url.hostname, url.port, args.api_key, args.model, args.clients, args.requests, args.max_tokens, args.seed)
        )
        rss_after = rss_mib(pid) if pid else None
        m = scrape(base)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    ttft = [r["ttft"] for r in results]
    lat = [r["latency"] for r in results]
    toks = sum(r["tokens"] for r in results)
    fmt_rss = lambda x: "n/a" if x is None else f"{x:.1f} MiB"  # noqa: E731
    print(f"moeflux serve load test: {args.clients} concurrent streaming clients, {args.requests} requests, "
          f"max_tokens {args.max_tokens}, greedy, {os.cpu_count()} CPUs")
    print(f"completed      {len(results)}/{args.requests}   errors {len(errors)}   "
          f"correct answers {sum(r['correct'] for r in results)}/{len(results)}")
    print(f"wall           {wall:.2f} s   {len(results) / wall:.1f} requests/s   {toks / wall:.1f} generated tokens/s")
    print(f"TTFT           p50 {pct(ttft, 50) * 1e3:.1f} ms   p95 {pct(ttft, 95) * 1e3:.1f} ms   max {max(ttft, default=0) * 1e3:.1f} ms")
    print(f"latency        p50 {pct(lat, 50) * 1e3:.1f} ms   p95 {pct(lat, 95) * 1e3:.1f} ms   mean {statistics.fmean(lat) * 1e3 if lat else 0:.1f} ms")
    print(f"server RSS     before {fmt_rss(rss_before)}   after warm-up {fmt_rss(rss_warm)}   after load {fmt_rss(rss_after)}")
    if m:
        print(f"server metrics prefill {m.get('moeflux_prefill_tokens_per_second', 0):.0f} tok/s, "
              f"decode {m.get('moeflux_decode_tokens_per_second', 0):.0f} tok/s (last request); "
              f"prompt tokens {m.get('moeflux_prompt_tokens_total', 0):.0f}, "
              f"prefix-cached {m.get('moeflux_cached_prompt_tokens_total', 0):.0f}, "
              f"429s {m.get('moeflux_requests_rejected_queue_full_total', 0):.0f}")
    for e in errors[:10]:
        print("error:", e)
    if errors or len(results) != args.requests:
        sys.exit(1)


if __name__ == "__main__":
    main()
