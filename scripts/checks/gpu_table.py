#!/usr/bin/env python3
"""The one table of scripts/checks/gpu-check.sh, from what its run wrote under WORK:

    python3 scripts/checks/gpu_table.py WORK

summary.txt (loadgen and parity lines), models/baseline.json (torch fp16 model-only) and
models/crossencoder.json (CrossEncoder.predict fp16 on text). Per model shape and workload: ours through gRPC
(32 clients), the two peers and our ratio to each against its target, the padding ratio at that load, p50/p99
of a single 100-document request on an idle server (1 client, mixed), and parity against sentence-transformers
fp32. Prints FAIL lines for every target missed; exits 1 if any was.
"""
import json
import pathlib
import re
import sys

# ours / torch fp16 model-only, per (model, workload); and the single-request latency targets in ms.
TARGETS = {("minilm", "mixed"): 1.5, ("minilm", "fixed256"): 1.3,
           ("xlmr-base", "mixed"): 1.3, ("xlmr-base", "fixed256"): 1.1}
P50_MS, P99_MS = 5.0, 8.0
LOAD = re.compile(r"^ours (?P<model>\S+) (?P<workload>\S+) (?P<clients>\d+) clients?: (?P<rest>.*)$")
PARITY = re.compile(r"^parity \S*?(?P<model>[^/\s]+)\.expected\.json: .*max \|logit diff\| (?P<diff>\S+) "
                    r".*identical order (?P<order>\d+/\d+) (?P<verdict>PASS|FAIL)")


def field(text: str, name: str):
    match = re.search(rf"\b{re.escape(name)}=([0-9.]+)", text)
    return float(match.group(1)) if match else None


def rates(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    return {(row["model"], row["workload"]): row["pairs_per_s"] for row in json.loads(path.read_text())}


def read(work: pathlib.Path):
    loads, parity = {}, {}
    summary = work / "summary.txt"
    for line in summary.read_text().splitlines() if summary.is_file() else []:
        if match := LOAD.match(line):
            loads[(match["model"], match["workload"], int(match["clients"]))] = match["rest"]
        elif match := PARITY.match(line):
            parity[match["model"]] = (float(match["diff"]), match["order"], match["verdict"])
    return loads, parity, rates(work / "models" / "baseline.json"), rates(work / "models" / "crossencoder.json")


def ratio(ours, peer):
    return ours / peer if ours and peer else None


def show(value, form):
    return "-" if value is None else form.format(value)


def main(work: pathlib.Path) -> int:
    loads, parity, torch_rates, ce_rates = read(work)
    failures = []
    print("| model | workload | ours gRPC pairs/s | torch fp16 model-only | CrossEncoder.predict fp16 | ours/torch "
          "(target) | ours/CrossEncoder | padding ratio | 1 request of 100 docs p50 / p99 ms | parity max abs diff, order |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (model, workload), target in TARGETS.items():
        load = loads.get((model, workload, 32), "")
        ours = field(load, "pairs/s")
        single = loads.get((model, "mixed", 1), "") if workload == "mixed" else ""
        p50, p99 = field(single, "p50"), field(single, "p99")
        versus_torch = ratio(ours, torch_rates.get((model, workload)))
        diff, order, verdict = parity.get(model, (None, "-", "missing"))
        print(f"| {model} | {workload} | {show(ours, '{:,.0f}')} | {show(torch_rates.get((model, workload)), '{:,.0f}')} "
              f"| {show(ce_rates.get((model, workload)), '{:,.0f}')} | {show(versus_torch, '{:.2f}')} (≥ {target}) "
              f"| {show(ratio(ours, ce_rates.get((model, workload))), '{:.2f}')} | {show(field(load, 'padding_ratio'), '{:.2f}')} "
              f"| {show(p50, '{:.1f}')} / {show(p99, '{:.1f}')} | {show(diff, '{:.1e}')}, {order} |")
        if versus_torch is None or versus_torch < target:
            failures.append(f"{model} {workload}: ours/torch {show(versus_torch, '{:.2f}')} below {target}")
        if workload == "mixed" and (p50 is None or p99 is None or p50 > P50_MS or p99 > P99_MS):
            failures.append(f"{model}: single request p50/p99 {show(p50, '{:.1f}')}/{show(p99, '{:.1f}')} ms "
                            f"over {P50_MS}/{P99_MS}")
        if workload == "mixed" and verdict != "PASS":
            failures.append(f"{model}: parity {verdict}")
    for failure in failures:
        print(f"FAIL {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(pathlib.Path(sys.argv[1])))
