#!/usr/bin/env python3
"""Summarise wsbench RESULT lines (JSON lines written by scripts/bench).

  bench-report.py RESULTS.jsonl --brief                 one line about the last run
  bench-report.py RESULTS.jsonl --summary FILE.md       a Markdown table of every run
  bench-report.py RESULTS.jsonl --chart FILE.png        latency vs offered load (sweep-* runs)

Only the standard library is needed, except matplotlib for --chart.
"""
import argparse
import json
import sys


def load(path):
    runs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("RESULT "):
                line = line[len("RESULT "):]
            if line:
                try:
                    runs.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return runs


def nodes_cpu(cost, key):
    """CPU µs per item of the server processes only (nodes, or the bare
    reference server; Redis apart): user, system, total."""
    u = s = 0.0
    found = False
    for p in cost.get("procs", []):
        per = p.get(key)
        if per and str(p.get("name", "")).startswith(("node", "bare")):
            u += per["user"]
            s += per["system"]
            found = True
    return (round(u, 3), round(s, 3), round(u + s, 3)) if found else None


def proc_cpu(cost, key, prefix):
    for p in cost.get("procs", []):
        per = p.get(key)
        if per and str(p.get("name", "")).startswith(prefix):
            return per["total"]
    return None


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def row(r):
    sc = r.get("scenario")
    label = r.get("label") or sc
    lat = r.get("latency_ms") or {}
    d = r.get("delivery") or {}
    cost = r.get("cost") or {}
    machine = (cost.get("machine") or {})
    out = {
        "label": label,
        "delivered": f"{d.get('delivered', '-')}/{d.get('expected', '-')}" if d else "-",
        "lost/dup/ooo": f"{d.get('lost', '-')}/{d.get('duplicated', '-')}/{d.get('out_of_order', '-')}" if d else "-",
        "p50": fmt(lat.get("p50")),
        "p99": fmt(lat.get("p99")),
        "p99.9": fmt(lat.get("p99.9")),
        "max": fmt(lat.get("max")),
        "cpu µs/deliv nodes u/s/t": "-",
        "redis µs/deliv": "-",
        "gen cpu%": fmt((cost.get("generator") or {}).get("cpu_pct"), 0),
        "other cpu%": fmt(machine.get("unexplained_pct"), 0),
        "notes": "",
    }
    notes = []
    if sc in ("fanout", "rooms"):
        c = nodes_cpu(cost, "cpu_us_per_delivery")
        if c:
            out["cpu µs/deliv nodes u/s/t"] = f"{c[0]:.2f}/{c[1]:.2f}/{c[2]:.2f}"
        rc = proc_cpu(cost, "cpu_us_per_delivery", "redis")
        if rc is not None:
            out["redis µs/deliv"] = fmt(rc)
        pub = r.get("publish") or {}
        notes.append(f"{pub.get('sent_per_s', '-')} msg/s sent")
        if pub.get("failed"):
            notes.append(f"publish failed {pub['failed']} {pub.get('errors')}")
        ended = (r.get("receivers") or {}).get("ended_early")
        if ended:
            notes.append(f"ended early {ended}")
        notes.append(f"{r.get('deliveries_per_s', 0):.0f} deliveries/s")
    elif sc == "conns":
        h = r.get("hold") or {}
        notes.append(f"held {h.get('held')}, dropped {h.get('dropped')} over {r['params']['hold_s']} s")
        for m in r.get("memory", []):
            notes.append(f"{m['name']} RSS/conn {m['rss_per_conn_kib']} KiB")
        c = r.get("connect") or {}
        notes.append(f"connect {c.get('per_second')}/s p99 {c.get('ms', {}).get('p99')} ms, failed {c.get('failed')}")
        if c.get("tcp_counters"):
            notes.append(f"tcp {c['tcp_counters']}")
    elif sc == "bare":
        # The reference server's own totals, written when it stopped.
        notes.append(f"bare server totals: {r.get('connections')} connections, {r.get('messages')} messages, "
                     f"{r.get('deliveries')} deliveries; dropped slow {r.get('dropped_slow')}, "
                     f"write errors {r.get('write_errors')}")
    elif sc == "instructions":
        # User-space instructions counted by callgrind (kernel work apart).
        i = r.get("instructions") or {}
        notes.append(f"{r.get('server')}: {fmt(i.get('per_delivery'), 0)} instructions per delivery, "
                     f"{fmt(i.get('per_message'), 0)} per message (user space, callgrind)")
        if not r.get("all_delivered_once"):
            notes.append("NOT every message delivered once")
    elif sc == "stalls" and r.get("error"):
        pass  # reported below
    elif sc == "stalls" and r.get("bursts"):
        # The machine itself: how long a fixed burst of work takes, timed
        # from its scheduled start, with no server involved.
        b = r["bursts"]
        t = b.get("took_ms") or {}
        out["p50"], out["p99"], out["p99.9"], out["max"] = (
            fmt(t.get("p50")), fmt(t.get("p99")), fmt(t.get("p99.9")), fmt(t.get("max")))
        p = r.get("params") or {}
        notes.append(f"no server: {p.get('burst_ms')} ms of work every {p.get('every_ms')} ms on each CPU, "
                     f"{b.get('count')} bursts timed from their scheduled start")
        if b.get("expected") is None:
            notes.append("ticks missed by overrunning bursts were skipped, not timed (older results)")
        elif b.get("not_run"):
            notes.append(f"{b['not_run']} of {b['expected']} bursts never started (over twice the duration)")
    elif sc == "stalls":
        # The machine itself: the latency columns hold how long its stalls
        # delay a moment taken at random (latency_floor_ms in older results).
        fl = r.get("stall_wait_ms") or r.get("latency_floor_ms") or {}
        out["p99"], out["p99.9"], out["max"] = fmt(fl.get("p99")), fmt(fl.get("p99.9")), fmt(fl.get("max"))
        notes.append(f"no server: wait for CPU stalls to end; all CPUs stalled {r.get('all_cpus_stalled_pct')}% "
                     f"of {(r.get('params') or {}).get('window_ms')} ms windows")
        for c in r.get("cpus", []):
            e = c.get("episode_ms") or {}
            # Older results measured the pace against the best window.
            pace, of = (c.get("pace_pct_of_usual"), "usual") if "pace_pct_of_usual" in c else (c.get("speed_pct_of_best"), "best")
            notes.append(f"cpu {c['cpu']}: {c['episodes_per_s']} episodes/s, p50 {fmt(e.get('p50'), 0)} ms, "
                         f"max {fmt(e.get('max'), 0)} ms, pace {fmt(pace, 0)}% of {of}")
    elif sc == "resume":
        st = r.get("storm") or {}
        rl = st.get("resume_ms") or {}
        out["p50"], out["p99"], out["p99.9"], out["max"] = (
            fmt(rl.get("p50")), fmt(rl.get("p99")), fmt(rl.get("p99.9")), fmt(rl.get("max")))
        notes.append(f"resume times; resumed {st.get('resumed')}/{st.get('clients')}, "
                     f"recovered {st.get('recovered_true')} (false {st.get('recovered_false')}), "
                     f"exact {r.get('exact_clients')}")
        if r.get("redis_stream_reads") is not None:
            notes.append(f"redis stream reads {r['redis_stream_reads']}")
        if st.get("failures"):
            notes.append(f"failures {st['failures']}")
        tc = (cost.get("tcp_counters") or {})
        if tc:
            notes.append(f"tcp {tc}")
    if r.get("machine_busy_before_pct") is not None and r["machine_busy_before_pct"] >= 20:
        notes.append(f"machine {r['machine_busy_before_pct']}% busy before the run")
    if r.get("timed_out"):
        notes.append("TIMED OUT")
    if r.get("error"):
        notes.append(f"error: {r['error']}")
    out["notes"] = "; ".join(notes)
    return out


def bare_label(label):
    """The label of the bare reference run that matches `label`, if any."""
    pinned = label.endswith("-pinned")
    base = label[: -len("-pinned")] if pinned else label
    if base.endswith("-bare") or "-redis2" in base:
        return None
    return base + "-bare" + ("-pinned" if pinned else "")


def ratios(runs):
    """roomcast / bare for every run with a bare twin: rows of a table."""
    by_label = {r.get("label"): r for r in runs if r.get("label")}
    rows = []
    for label, r in by_label.items():
        twin = by_label.get(bare_label(label) or "")
        if r.get("scenario") not in ("fanout", "rooms") or twin is None:
            continue
        lat, blat = r.get("latency_ms") or {}, twin.get("latency_ms") or {}
        cpu = nodes_cpu(r.get("cost") or {}, "cpu_us_per_delivery")
        bcpu = nodes_cpu(twin.get("cost") or {}, "cpu_us_per_delivery")

        def pair(a, b):
            if a is None or b is None:
                return "-"
            return f"{a:.2f} / {b:.2f} = {a / b:.2f}" if b else f"{a:.2f} / {b:.2f}"

        rows.append((label,
                     pair(lat.get("p50"), blat.get("p50")),
                     pair(lat.get("p99"), blat.get("p99")),
                     pair(lat.get("p99.9"), blat.get("p99.9")),
                     pair(cpu and cpu[2], bcpu and bcpu[2])))
    return rows


def summary(runs):
    rows = [row(r) for r in runs]
    if not rows:
        return "(no results)\n"
    cols = list(rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    text = "\n".join(lines) + ("\n\nLatencies in ms (resume rows: time to `joined`; stalls rows: how long "
                                "the machine's own stalls delay work arriving at a random moment, or how long "
                                "a burst of work took).\n")
    text += table("roomcast / the bare reference server (`wsbench bare`), the same load minutes apart "
                  "(below 1: roomcast did better):",
                  ("run", "p50 ms", "p99 ms", "p99.9 ms", "server CPU µs/delivery"), ratios(runs))
    text += table("User-space instructions (callgrind; the kernel's TCP path is not counted), "
                  "the difference between a short and a long run of each load:",
                  ("load", "server", "per delivery", "per message"), instruction_table(runs))
    return text


def table(title, header, rows):
    """A titled Markdown table of `rows`, or nothing when there are none."""
    if not rows:
        return ""
    lines = [f"\n{title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def instruction_table(runs):
    """The instructions records: rows of load, server, per delivery, per
    message (roomcast's with its ratio to the bare server's, when there is one)."""
    counted = [r for r in runs if r.get("scenario") == "instructions"]
    bare = {r["label"].rsplit("-", 1)[0]: r["instructions"] for r in counted if r.get("server") == "bare"}
    rows = []
    for r in counted:
        i = r["instructions"]
        load = r["label"].removeprefix("instructions-").split("-")[0]
        twin = bare.get(f"instructions-{load}") if r.get("server") != "bare" else None

        def cell(key):
            if twin and twin.get(key):
                return f"{i[key]:.0f} ({i[key] / twin[key]:.2f}x bare)"
            return f"{i[key]:.0f}"

        rows.append((load, r.get("server", "-"), cell("per_delivery"), cell("per_message")))
    return rows


# The bare server's p99 is drawn at most this high (ms).
BARE_CLIP_MS = 1000


def chart(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    series = {}
    bare = []
    for r in runs:
        label = r.get("label") or ""
        if not label.startswith("sweep-") or r.get("scenario") != "fanout":
            continue
        if "-bare" in label:
            lat = r.get("latency_ms") or {}
            if lat.get("count"):
                bare.append((r["params"]["rate"], lat["p99"]))
            continue
        setup = "2 nodes + Redis" if "-redis2" in label else "1 node"
        lat = r.get("latency_ms") or {}
        if not lat.get("count"):
            continue
        series.setdefault(setup, []).append((r["params"]["rate"], lat, r["params"]["subs"]))
    if not series:
        print("bench-report: no sweep-* runs to chart", file=sys.stderr)
        return
    # The machine alone (wsbench stalls --burst-ms): the p99 of a burst of
    # work about as long as one message's fan-out, beside the p99 above.
    reference = None
    for r in runs:
        b = r.get("bursts") if r.get("scenario") == "stalls" else None
        if b and (b.get("took_ms") or {}).get("p99") is not None and r["params"]["burst_ms"] <= 5:
            reference = (r["params"]["burst_ms"], b["took_ms"]["p99"])
    bare.sort()
    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4.5), sharey=True, squeeze=False)
    for ax, (setup, pts) in zip(axes[0], sorted(series.items())):
        pts.sort(key=lambda p: p[0])
        rates = [p[0] for p in pts]
        for key, style in (("p50", "o-"), ("p99", "s-"), ("p99.9", "^-"), ("max", "x:")):
            ax.plot(rates, [p[1][key] for p in pts], style, label=key)
        subs = pts[0][2]
        ax.set_title(f"fan-out to {subs} subscribers, {setup}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(rates)
        ax.set_xticklabels([f"{r:g}" for r in rates])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"offered load, messages/s published (x {subs} deliveries each)")
        if bare:
            # Past saturation the bare server's p99 is seconds: drawn at the
            # top of the panel, with its value, so roomcast's curves keep
            # their scale.
            top = BARE_CLIP_MS
            ax.plot([b[0] for b in bare], [min(b[1], top) for b in bare], "s--", color="grey", alpha=0.7,
                    label="p99, bare reference server")
            for rate, p99 in bare:
                if p99 > top:
                    ax.annotate(f"{p99 / 1000:.1f} s", (rate, top), textcoords="offset points",
                                xytext=(0, -14), ha="center", fontsize=8, color="grey")
        if reference is not None:
            ax.axhline(reference[1], color="grey", linestyle="--", linewidth=1,
                       label=f"no server: {reference[0]:g} ms of work, p99")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("publish-to-deliver latency, ms")
    pinned = any((r.get("label") or "").endswith("-pinned") for r in runs)
    where = "server and generator on a core each" if pinned else "2 cores shared with the generator"
    fig.suptitle(f"roomcast latency vs offered load (wsbench, loopback, {where})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"bench-report: wrote {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--brief", action="store_true")
    ap.add_argument("--summary")
    ap.add_argument("--chart")
    a = ap.parse_args()
    runs = load(a.results)
    if a.brief:
        if runs:
            r = row(runs[-1])
            print("  " + "  ".join(f"{k} {v}" for k, v in r.items() if v not in ("-", "")))
        return
    if a.summary:
        with open(a.summary, "w") as f:
            f.write(summary(runs))
    if a.chart:
        chart(runs, a.chart)


if __name__ == "__main__":
    main()
