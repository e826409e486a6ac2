"""Checks a Chrome trace written by accelerated::callbacks::Profiler, with nothing but the JSON module.

Usage: check_trace.py TRACE OPTIMIZER_RANGES NAME... [--shapes]
Every NAME must be a range of the trace; OPTIMIZER_RANGES is how many accelerated::optimizer ranges it must hold;
some aten:: operator must lie inside an accelerated::forward range and some inside an accelerated::backward range;
with --shapes, some aten::addmm must carry its input shapes.
Prints what it found; exits 1 naming the first thing missing."""
import collections
import json
import sys


def main():
    shapes = "--shapes" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--shapes"]
    path, optimizer_ranges, names = args[0], int(args[1]), args[2:]
    with open(path) as f:
        trace = json.load(f)  # raises on anything that is not JSON
    events = trace["traceEvents"]
    for e in events:
        for key in ("name", "cat", "ph", "ts", "dur", "pid", "tid"):
            if key not in e:
                sys.exit(f"{path}: an event without '{key}': {e}")
        if e["ph"] != "X" or e["dur"] < 0 or e["ts"] < 0:
            sys.exit(f"{path}: not a complete event with a time and a duration: {e}")
    counts = collections.Counter(e["name"] for e in events)
    print(json.dumps({"events": len(events), "phases": {n: c for n, c in counts.items() if n.startswith("accelerated::")},
                      "window": trace["otherData"]["window"]}))
    for name in names:
        if counts[name] == 0:
            sys.exit(f"{path}: no '{name}' range")
    if counts["accelerated::optimizer"] != optimizer_ranges:
        sys.exit(f"{path}: {counts['accelerated::optimizer']} optimizer ranges, not {optimizer_ranges}")

    def inside(phase):
        ranges = [e for e in events if e["name"] == phase]
        return any(r["ts"] <= e["ts"] and e["ts"] + e["dur"] <= r["ts"] + r["dur"]
                   for e in events if e["cat"] == "operator" and e["name"].startswith("aten::") for r in ranges)
    for phase in ("accelerated::forward", "accelerated::backward"):
        if not inside(phase):
            sys.exit(f"{path}: no aten:: operator inside an {phase} range")
    if shapes and not any(e["name"] == "aten::addmm" and "[" in e.get("args", {}).get("input_shapes", "")
                          for e in events):
        sys.exit(f"{path}: no aten::addmm with its input shapes")


main()
