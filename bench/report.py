#!/usr/bin/env python3
"""The benchmark's tables, from the measurements run.sh collected (standard library only).

Usage: report.py RUNS.tsv META.env RESULTS.md [RATIOS.tsv]

RUNS.tsv: one measurement a line, "ROUND<TAB>NAME<TAB>VALUE", NAME being
  VARIANT                             wrk: requests/s (stock, cached, full, rs256, es256,
                                      nocache, rbac10, rbac1000, zone100, zone1m, proxy,
                                      egress; those run)
  cpu-VARIANT, busy-VARIANT           the nginx worker's CPU µs per request, busy share %
  verify-{awslc,raw,full,wall}-ALG    verify_rate (ALG rs256, es256): aws-lc alone on a key
                                      parsed once, jsonwebtoken, the mesh_core path (per CPU
                                      second), the mesh_core path per wall-clock second
  rss-{warm,warm-at,end,sent}         the memory check (round "rss")
META.env: KEY=VALUE lines (date, nginx version, command, machine notes, run parameters).

Medians per name over the rounds. The targets, as ratios to stock nginx measured in the same run:
  cached/stock >= 0.97; full/stock >= 0.92; egress/proxy >= 0.95 (an egress route with a
  cached outbound token against a plain proxy_pass to the same upstream);
  nocache/stock is shown without a target (a comparison: the shape of a module without a
  token cache, one RS256 verification per request);
  for RS256 and ES256: measured / ideal >= 0.90, ideal = 1 / (1/stock + 1/awslc), the cost
  of stock nginx plus the raw aws-lc verification;
  rbac1000 costs at most rbac10 + 5 %: rbac1000/rbac10 >= 1/1.05;
  zone1m answers as fast as zone100 (within the same 5 %): zone1m/zone100 >= 1/1.05;
  the worker's RSS flat after warm-up: end <= warm-up + 5 %.
RATIOS.tsv (optional): "NAME<TAB>RATIO" for each ratio computed (for bench/guard.sh).
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

TARGETS = {
    "cached": 0.97,
    "full": 0.92,
    "rs256": 0.90,
    "es256": 0.90,
    "egress": 0.95,
    "rbac": 1 / 1.05,
    "zone": 1 / 1.05,
}
RSS_GROWTH = 0.05
KEEP_MARKER = "<!-- report.py keeps what follows -->"
BUSY_QUIET = 90.0


def fmt(n: float) -> str:
    return f"{n:,.0f}".replace(",", " ")


def verdict(value: float, target: float) -> str:
    return f"target ≥ {target:.3f}: **{'met' if value >= target else 'MISSED'}**"


def main() -> None:
    runs_path, meta_path, out_path = sys.argv[1:4]
    ratios_path = sys.argv[4] if len(sys.argv) > 4 else None
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
    has = lambda *names: all(n in med for n in names)  # noqa: E731
    ratios: dict[str, float] = {}
    cpu_ratios: dict[str, float] = {}
    rows: list[tuple[str, str, str]] = []
    stock = med["stock"]
    rows.append(("stock nginx, static 100-byte file (module not loaded)", fmt(stock),
                 "1.00 (baseline)"))

    def vs_stock(key: str, label: str) -> None:
        if not has(key):
            return
        ratios[key] = med[key] / stock
        cpu_ratios[key] = med["cpu-stock"] / med[f"cpu-{key}"]
        rows.append((label, fmt(med[key]),
                     f"{key}/stock = {ratios[key]:.3f} ({verdict(ratios[key], TARGETS[key])})"))

    vs_stock("cached", "cached: `mesh_auth`, one RS256 token on every request")
    vs_stock("full", "full: cached token + RBAC (10 rules: regex, claim rules) + rate limit "
                     "(never refusing) + `mesh_trace on` + `mesh_trace_response on` + every span "
                     "exported (`mesh_trace_export` to a loopback receiver) + counted by caller "
                     "with the duration histogram (`mesh_status`)")
    if has("nocache"):
        ratios["nocache"] = med["nocache"] / stock
        cpu_ratios["nocache"] = med["cpu-stock"] / med["cpu-nocache"]
        rows.append(("comparison, the shape of a module without a token cache: "
                     "`mesh_token_cache off`, one RS256 token verified on every request",
                     fmt(med["nocache"]), f"nocache/stock = {ratios['nocache']:.3f}"))
    if has("proxy", "egress"):
        ratios["egress"] = med["egress"] / med["proxy"]
        cpu_ratios["egress"] = med["cpu-proxy"] / med["cpu-egress"]
        rows.append(("plain `proxy_pass` to a loopback nginx (kept-alive connections), module "
                     "not loaded", fmt(med["proxy"]), ""))
        rows.append(("egress route: the same with `mesh_outbound_auth` (cached outbound token)",
                     fmt(med["egress"]), f"egress/proxy = {ratios['egress']:.3f} "
                     f"({verdict(ratios['egress'], TARGETS['egress'])})"))
    for alg in ("rs256", "es256"):
        if not has(alg, f"verify-awslc-{alg}"):
            continue
        name = alg.upper()
        awslc = med[f"verify-awslc-{alg}"]
        ideal = 1 / (1 / stock + 1 / awslc)
        ratios[alg] = med[alg] / ideal
        ideal_us = med["cpu-stock"] + 1e6 / awslc
        cpu_ratios[alg] = ideal_us / med[f"cpu-{alg}"]
        rows += [
            (f"{name} raw verification: aws-lc-rs on a key parsed once, 1 core, per CPU second",
             fmt(awslc), f"mesh_core path {fmt(med[f'verify-full-{alg}'])}/s "
                         f"(jsonwebtoken {fmt(med[f'verify-raw-{alg}'])}/s)"),
            (f"{name} ideal = 1 / (1/stock + 1/raw)", fmt(ideal), ""),
            (f"rotating {name}: {meta['TOKENS']} distinct tokens, every request a verification",
             fmt(med[alg]), f"measured/ideal = {ratios[alg]:.3f} "
                            f"({verdict(ratios[alg], TARGETS[alg])})"),
        ]
    for key, small, big, label in (
        ("rbac", "rbac10", "rbac1000", "RBAC: 1 000 rules vs 10 (the caller's exact principal last)"),
        ("zone", "zone100", "zone1m",
         f"rate-limit zone holding {meta.get('ZONE_KEYS', '?')} keys vs 100 keys"),
    ):
        if not has(small, big):
            continue
        ratios[key] = med[big] / med[small]
        cpu_ratios[key] = med[f"cpu-{small}"] / med[f"cpu-{big}"]
        rows.append((label, f"{fmt(med[big])} vs {fmt(med[small])}",
                     f"{big}/{small} = {ratios[key]:.3f} ({verdict(ratios[key], TARGETS[key])}, "
                     f"i.e. at most +5 %)"))
    rss_text = None
    if has("rss-warm", "rss-end"):
        growth = (med["rss-end"] - med["rss-warm"]) / med["rss-warm"]
        ok = growth <= RSS_GROWTH
        rss_text = (f"{fmt(med['rss-sent'])} distinct HS256 tokens, each once: worker RSS "
                    f"{med['rss-warm'] / 1024:.1f} MB after {fmt(med['rss-warm-at'])}, "
                    f"{med['rss-end'] / 1024:.1f} MB at the end ({growth * 100:+.1f} %; target "
                    f"≤ +{RSS_GROWTH * 100:.0f} %: **{'met' if ok else 'MISSED'}**)")
        ratios["rss"] = 1 - growth
    missed = [k for k, v in ratios.items() if k in TARGETS and v < TARGETS[k]]
    if "rss" in ratios and ratios["rss"] < 1 - RSS_GROWTH:
        missed.append("rss")

    table = ["| variant | requests/s | ratio |", "|---|---:|---|"]
    table += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    cpu_table = ["| ratio | from requests/s | from worker CPU µs/request | target |",
                 "|---|---:|---:|---:|"]
    cpu_table += [f"| {k} | {ratios[k]:.3f} | {cpu_ratios.get(k, 0):.3f} | "
                  f"{f'{TARGETS[k]:.3f}' if k in TARGETS else '—'} |"
                  for k in ratios if k != "rss"]
    names = [n for n in ("stock", "cached", "full", "rs256", "es256", "nocache", "rbac10",
                         "rbac1000", "zone100", "zone1m", "proxy", "egress") if n in med]
    order = names + [f"cpu-{n}" for n in names] + sorted(
        n for n in med if n.startswith("verify-"))

    def cell(name: str, x: float) -> str:
        return f"{x:.2f}" if name.startswith("cpu-") else fmt(x)

    per_round = ["| round | " + " | ".join(order) + " |", "|---|" + "---:|" * len(order)]
    for rnd in sorted((r for r in rounds if r.isdigit()), key=int):
        per_round.append(f"| {rnd} | "
                         + " | ".join(cell(n, rounds[rnd].get(n, 0)) for n in order) + " |")
    per_round.append("| **median** | " + " | ".join(f"**{cell(n, med[n])}**" for n in order)
                     + " |")
    busy_all = [x for n in names for x in runs.get(f"busy-{n}", [])]
    disturbed = sum(1 for x in busy_all if x < BUSY_QUIET)
    quiet = (f"{disturbed} of {len(busy_all)} wrk runs had the nginx worker busy less than "
             f"{BUSY_QUIET:.0f} % of the time: the machine was not quiet, so requests/s are "
             "noisy; compare with the CPU-time column." if disturbed else
             "The nginx worker was busy ≥ 90 % in every wrk run: it set the pace.")
    md = [
        "# ngx-mesh benchmark",
        "",
        f"- date: {meta['DATE']}",
        f"- nginx: {meta['NGINX_VERSION']} (`{meta['NGINX']}`), `worker_processes 1`, "
        "`access_log off`, keepalive",
        f"- module: `{meta['MODULE']}`",
        f"- command: `{meta['COMMAND']}`",
        f"- load: wrk {meta['WRK_VERSION']} `{meta['WRK_ARGS']}`, {meta['ROUNDS']} rounds × "
        f"{meta['DURATION']} s per variant in rotating order, median per variant; every "
        "response checked (any status ≥ 400 or socket error fails the run); verify_rate "
        f"{meta['VERIFY_SECS']} s per measurement, once per round",
        f"- machine: {meta['MACHINE']}",
        *([f"- spans of the full row: {meta['SPANS']}"] if meta.get("SPANS") else []),
        "",
        *table,
        "",
        *([f"Memory: {rss_text}", ""] if rss_text else []),
        quiet,
        "",
        "## The ratios, from requests/s and from the worker's CPU time",
        "",
        "The worker's CPU time per request (`/proc/PID/schedstat` over each wrk run) does not "
        "need the worker to be saturated and moves less with other load on the machine.",
        "",
        *cpu_table,
        "",
        "## Every measurement",
        "",
        *per_round,
        "",
    ]
    # Notes written by hand below the marker (profiles, instruction counts) are kept.
    kept = ""
    try:
        with open(out_path) as f:
            old = f.read()
        if KEEP_MARKER in old:
            kept = old[old.index(KEEP_MARKER):]
    except FileNotFoundError:
        pass
    with open(out_path, "w") as f:
        f.write("\n".join(md) + ("\n" + kept if kept else ""))
    if ratios_path:
        with open(ratios_path, "w") as f:
            for k, v in ratios.items():
                f.write(f"{k}\t{v:.4f}\n")
            for k, v in cpu_ratios.items():
                f.write(f"cpu-{k}\t{v:.4f}\n")
    print()
    print("\n".join(table))
    print()
    if rss_text:
        print("Memory:", rss_text.replace("**", ""))
    print("\n".join(cpu_table))
    print(quiet)
    print("Targets:", f"MISSED: {', '.join(missed)}" if missed else "all met")


if __name__ == "__main__":
    main()
