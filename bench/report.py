#!/usr/bin/env python3
"""The benchmark's tables, from the measurements run.sh collected (standard library only).

Usage: report.py RUNS.tsv META.env RESULTS.md

RUNS.tsv: one measurement a line, "ROUND<TAB>NAME<TAB>VALUE", NAME being
  stock, cached, rs256, es256, full  wrk: requests/s
  cpu-VARIANT                        the nginx worker's CPU time per request, µs
  busy-VARIANT                       the worker's busy share during the run, %
  verify-{raw,full}-{rs256,es256}    verify_rate: verifications per CPU second (one core)
  verify-wall-{rs256,es256}          verify_rate, full path: per wall-clock second
META.env: KEY=VALUE lines (date, nginx version, command, machine notes, run parameters).

Prints the tables and writes RESULTS.md. Medians per name over the rounds. The formulas:
cached/stock >= 0.90, full/stock >= 0.85, and for each rotating variant ideal = 1 / (1/stock + 1/verify_rate)
with verify_rate the full mesh_core path, efficiency = measured/ideal >= 0.85.

A second table does the same sums with the worker's CPU time per request (cost = 1/rate):
it does not need the worker to be saturated, and other load on the machine moves it less.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

CACHED_TARGET = 0.90
FULL_TARGET = 0.85
# A wrk run whose nginx worker was busy less than this was held back by something else on the
# machine (another process on the worker's core, or wrk starved on its own).
BUSY_QUIET = 90.0
EFFICIENCY_TARGET = 0.85
VARIANTS = ("stock", "cached", "rs256", "es256", "full")
ALGS = ("rs256", "es256")


def fmt(n: float) -> str:
    return f"{n:,.0f}".replace(",", " ")


def verdict(value: float, target: float) -> str:
    return f"target ≥ {target:.2f}: **{'met' if value >= target else 'MISSED'}**"


def main() -> None:
    runs_path, meta_path, out_path = sys.argv[1:4]
    runs: dict[str, list[float]] = defaultdict(list)
    rounds: dict[str, dict[str, float]] = defaultdict(dict)
    with open(runs_path) as f:
        for line in f:
            rnd, name, value = line.split()
            runs[name].append(float(value))
            rounds[rnd][name] = float(value)
    with open(meta_path) as f:
        meta = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    med = {k: statistics.median(v) for k, v in runs.items()}
    missed = []

    # The table of the brief: requests/s.
    stock, cached = med["stock"], med["cached"]
    rows = [
        ("stock nginx, static 100-byte file (module not loaded)", stock, "1.00 (baseline)"),
        ("cached: `mesh_auth`, one RS256 token on every request", cached,
         f"cached/stock = {cached / stock:.3f} ({verdict(cached / stock, CACHED_TARGET)})"),
    ]
    if cached / stock < CACHED_TARGET:
        missed.append("cached/stock")
    full_ratio = med["full"] / stock
    rows.append(("full: cached token + RBAC (10 rules) + rate limit (never refusing) + "
                 "`mesh_trace on`", med["full"],
                 f"full/stock = {full_ratio:.3f} ({verdict(full_ratio, FULL_TARGET)})"))
    if full_ratio < FULL_TARGET:
        missed.append("full/stock")
    for alg in ALGS:
        name = alg.upper()
        full, raw = med[f"verify-full-{alg}"], med[f"verify-raw-{alg}"]
        ideal = 1 / (1 / stock + 1 / full)
        eff = med[alg] / ideal
        if eff < EFFICIENCY_TARGET:
            missed.append(f"{name} efficiency")
        rows += [
            (f"{name} verify rate, 1 core: full `mesh_core::token::verify` path, per CPU second",
             full,
             f"raw `jsonwebtoken::crypto::verify`: {fmt(raw)}/s (full/raw = {full / raw:.2f})"),
            (f"{name} ideal = 1 / (1/stock + 1/verify_rate)", ideal, ""),
            (f"rotating {name}: {meta['TOKENS']} distinct tokens, every request a cache miss",
             med[alg], f"efficiency = measured/ideal = {eff:.3f} "
             f"({verdict(eff, EFFICIENCY_TARGET)})"),
        ]
    table = ["| variant | requests/s | ratio |", "|---|---:|---|"]
    table += [f"| {v} | {fmt(n)} | {r} |" for v, n, r in rows]

    # The cross-check: the worker's CPU µs per request.
    cost = {v: med[f"cpu-{v}"] for v in VARIANTS}
    busy = {v: med[f"busy-{v}"] for v in VARIANTS}
    cpu_rows = [
        ("stock", "1.00 (baseline)"),
        ("cached", f"stock/cached = {cost['stock'] / max(cost['cached'], 1e-9):.3f} "
                   f"({verdict(cost['stock'] / max(cost['cached'], 1e-9), CACHED_TARGET)})"),
    ]
    cpu_rows.append(("full", f"stock/full = {cost['stock'] / max(cost['full'], 1e-9):.3f} "
                             f"({verdict(cost['stock'] / max(cost['full'], 1e-9), FULL_TARGET)})"))
    for alg in ALGS:
        ideal_us = cost["stock"] + 1e6 / med[f"verify-full-{alg}"]
        eff = ideal_us / max(cost[alg], 1e-9)
        cpu_rows.append((alg, f"ideal = stock + 1/verify_rate = {ideal_us:.1f} µs; "
                              f"efficiency = ideal/measured = {eff:.3f} "
                              f"({verdict(eff, EFFICIENCY_TARGET)})"))
    cpu_table = ["| variant | worker CPU µs/request | worker busy | ratio |", "|---|---:|---:|---|"]
    cpu_table += [f"| {v} | {cost[v]:.2f} | {busy[v]:.0f} % | {r} |" for v, r in cpu_rows]
    if min(cost.values()) <= 0:
        cpu_table = ["(not available: this system gives no /proc/PID/schedstat)"]

    # Every measurement, so the noise can be judged.
    order = [*VARIANTS, *(f"verify-{k}-{a}" for a in ALGS for k in ("full", "raw", "wall")),
             *(f"cpu-{v}" for v in VARIANTS)]

    def cell(name: str, x: float) -> str:
        return f"{x:.2f}" if name.startswith("cpu-") else fmt(x)

    per_round = ["| round | " + " | ".join(order) + " |", "|---|" + "---:|" * len(order)]
    for rnd in sorted(rounds, key=int):
        per_round.append(f"| {rnd} | "
                         + " | ".join(cell(n, rounds[rnd].get(n, 0)) for n in order) + " |")
    per_round.append("| **median** | " + " | ".join(f"**{cell(n, med[n])}**" for n in order)
                     + " |")

    busy_all = [x for v in VARIANTS for x in runs[f"busy-{v}"]]
    disturbed = sum(1 for x in busy_all if x < BUSY_QUIET)
    quiet = (f"{disturbed} of {len(busy_all)} wrk runs had the nginx worker busy less than "
             f"{BUSY_QUIET:.0f} % of the time: the machine was not quiet (other processes took "
             "the worker's core or starved wrk), so requests/s are noisy; the CPU-time table "
             "is the one to trust." if disturbed else
             "The nginx worker was busy ≥ 90 % in every wrk run: it set the pace.")

    note = ("wrk shares the machine's cores with nginx (nginx's one worker pinned to one core, "
            "wrk to the other, when there are two), so absolute numbers say little about nginx "
            "alone: only the ratios within one run mean anything.")
    md = [
        "# ngx-mesh benchmark",
        "",
        f"- date: {meta['DATE']}",
        f"- nginx: {meta['NGINX_VERSION']} (`{meta['NGINX']}`), `worker_processes 1`, "
        "`access_log off`, keepalive",
        f"- module: `{meta['MODULE']}`",
        f"- command: `{meta['COMMAND']}`",
        f"- load: wrk {meta['WRK_VERSION']} `{meta['WRK_ARGS']}`, {meta['ROUNDS']} rounds × "
        f"{len(VARIANTS)} variants × {meta['DURATION']} s in rotating order, median per variant; "
        f"verify_rate {meta['VERIFY_SECS']} s per measurement, once per round",
        f"- machine: {meta['MACHINE']}",
        "",
        *table,
        "",
        f"Note: {note}",
        "",
        quiet,
        "",
        "## Cross-check: the nginx worker's CPU time per request",
        "",
        "The same ratios from what a request costs the worker (its CPU time during each wrk run "
        "from `/proc/PID/schedstat`, over the requests; median over the rounds). `worker busy` "
        "near 100 % means the worker, not wrk, set the pace.",
        "",
        *cpu_table,
        "",
        "## Every measurement",
        "",
        "wrk in requests per second; verify_rate in verifications per CPU second (`full`, `raw`) "
        "and per wall-clock second (`wall`, full path); `cpu-*` in µs of worker CPU per "
        "request.",
        "",
        *per_round,
        "",
    ]
    with open(out_path, "w") as f:
        f.write("\n".join(md))

    print()
    print("\n".join(table))
    print()
    print("Cross-check, from the worker's CPU time per request:")
    print("\n".join(cpu_table))
    print()
    print("\n".join(per_round))
    print()
    print(f"Note: {note}")
    print(quiet)
    print("Targets:", f"MISSED: {', '.join(missed)}" if missed else "all met (requests/s table)")


if __name__ == "__main__":
    main()
