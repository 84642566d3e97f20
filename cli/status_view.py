"""What ``etrain status`` draws (pure: a :class:`JobState`, the time and a step-time history in,
rich renderables out; no I/O, the clock injected).

Sections, top to bottom: a header (job, world, epoch, step, throughput, uptime, restarts), the
nodes and their workers (rank, pid, state, step, step time, speed, share, spares), the
snapshots (newest committed step, memory per node, records, chunks, disk tier), the events
timeline (failures and recoveries with their split, re-plans, with times), and a sparkline of
the step time. Everything fits 80 columns; wider terminals get wider tables.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

TIMELINE = 8  # events shown
BARS = "▁▂▃▄▅▆▇█"
SHOWN_KINDS = {  # the events the timeline shows, and how each is named there
    "fault": "fault", "worker_lost": "lost", "worker_hung": "hung", "node_lost": "node lost",
    "reconfigure": "reconfigure", "world_changed": "world", "recovered": "recovered",
    "request_restart": "restart", "replan": "re-plan", "straggler_failed": "straggler",
    "start_spares": "spares", "grow": "grow", "fail_job": "FAILED", "finish": "finished",
    "ride_out": "etcd away", "etcd_back": "etcd back", "check_peers": "lease?",
    "chaos": "chaos", "chaos_ended": "chaos end", "rebuild_failed": "rebuild failed",
}  # fmt: skip


def _clock(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def _workers(state) -> list:
    return [w for node in state.nodes.values() for w in node.workers]


def pace(state) -> tuple[int, float]:
    """The job's step (the furthest running rank's) and its median step time (0: none)."""
    ranked = [w for w in _workers(state) if w.rank >= 0 and w.state == "RUNNING"]
    paced = sorted(w.step_s for w in ranked if w.step_s > 0)
    return max((w.step for w in ranked), default=-1), paced[len(paced) // 2] if paced else 0.0


def header(state, now: float) -> Text:
    ranked = [w for w in _workers(state) if w.rank >= 0 and w.state == "RUNNING"]
    spares = sum(1 for w in _workers(state) if w.spare)
    step, step_s = pace(state)
    started = min((n.started for n in state.nodes.values() if n.started), default=now)
    restarts = max((n.restart_count for n in state.nodes.values()), default=0)
    world = state.world
    ranks = world.size if world is not None else len(ranked)
    nodes = len(world.nodes) if world is not None else len(state.nodes)
    speed = sum(w.speed for w in ranked)
    batch = max((n.global_batch for n in state.nodes.values()), default=0)
    logical = max((n.logical_workers for n in state.nodes.values()), default=0)
    line = Text()  # three short lines: who, how fast, since when
    line.append(f"job {state.job_id}", style="bold")
    line.append(f"  {nodes} node(s), {ranks} rank(s)")
    if logical:
        line.append(f", {logical} logical workers")
    if spares:
        line.append(f", {spares} spare(s)")
    line.append(f"\nepoch {world.epoch}  " if world is not None else "\n")
    line.append(f"step {step if step >= 0 else '-'}")
    if step_s:
        line.append(f"  {step_s:.3f} s/step")
    if batch:
        line.append(f"  batch {batch}")
        if step_s:
            line.append(f"  {batch / step_s:,.0f} samples/s")
    if speed:
        line.append(f"  compute {speed:,.0f}/s")
    if state.attention is not None:
        plan = state.attention.details
        line.append(f"  attention {plan.get('naive', 1.0):.2f}->{plan.get('planned', 1.0):.2f}")
    line.append(f"\nup {_clock(now - started)}  restarts {restarts}  etcd {state.etcd}")
    return line


def workers_table(state, now: float, max_rows: int = 64) -> Table:
    """A row per worker; past ``max_rows`` workers, a row per node (the least healthy
    first), at most ``max_rows`` of them."""
    if len(_workers(state)) > max_rows:
        return _nodes_table(state, now, max_rows)
    table = Table(title="workers", title_justify="left", expand=False, padding=(0, 1))
    for column, justify in (("node", "left"), ("rank", "right"), ("pid", "right"),
                            ("state", "left"), ("step", "right"), ("s/step", "right"),
                            ("speed", "right"), ("share", "right")):  # fmt: skip
        table.add_column(column, justify=justify, no_wrap=True)
    for node_id in sorted(set(state.nodes) | set(state.registered)):
        node = state.nodes.get(node_id)
        if node is None:
            table.add_row(node_id, "", "", "starting", "", "", "", "")
            continue
        stale = now - node.updated > 10
        name = node_id + (f" ({_clock(now - node.updated)} old)" if stale else "")
        if not node.workers:
            table.add_row(name, "", "", node.state.lower(), "", "", "", "")
        for i, w in enumerate(sorted(node.workers, key=lambda w: (w.spare, w.rank, w.slot))):
            rank = "spare" if w.spare else str(w.rank) if w.rank >= 0 else "-"
            worker = w.state.lower() if w.exit_code is None else f"exit {w.exit_code}"
            table.add_row(name if i == 0 else "", rank, str(w.pid), worker,
                          str(w.step) if w.step >= 0 else "",
                          f"{w.step_s:.3f}" if w.step_s > 0 else "",
                          f"{w.speed:,.0f}/s" if w.speed > 0 else "",
                          f"{w.share:.1%}" if w.share >= 0 else "")  # fmt: skip
    return table


def _nodes_table(state, now: float, max_rows: int) -> Table:
    table = Table(title="nodes (a row per node)", title_justify="left", padding=(0, 1))
    for column, justify in (("node", "left"), ("ranks", "left"), ("running", "right"),
                            ("step", "right"), ("s/step", "right"), ("speed min-max", "right"),
                            ("share", "right")):  # fmt: skip
        table.add_column(column, justify=justify, no_wrap=True)
    rows = []
    for node_id in sorted(set(state.nodes) | set(state.registered)):
        node = state.nodes.get(node_id)
        if node is None:
            rows.append((0, [node_id, "", "starting", "", "", "", ""]))
            continue
        ranked = [w for w in node.workers if w.rank >= 0]
        running = sum(1 for w in node.workers if w.state == "RUNNING")
        ranks = sorted(w.rank for w in ranked)
        steps = [w.step for w in ranked if w.step >= 0]
        paces = [w.step_s for w in ranked if w.step_s > 0]
        speeds = [w.speed for w in ranked if w.speed > 0]
        shares = [w.share for w in ranked if w.share >= 0]
        healthy = running == len(node.workers) and now - node.updated <= 10
        rows.append((1 if healthy else 0, [
            node_id, f"{ranks[0]}-{ranks[-1]}" if ranks else "-",
            f"{running}/{len(node.workers)}", str(min(steps)) if steps else "",
            f"{max(paces):.3f}" if paces else "",
            f"{min(speeds):,.0f}-{max(speeds):,.0f}/s" if speeds else "",
            f"{sum(shares):.1%}" if shares else "",
        ]))  # fmt: skip
    rows.sort(key=lambda row: row[0])  # the least healthy first (a stable sort)
    for _, row in rows[:max_rows]:
        table.add_row(*row)
    if len(rows) > max_rows:
        table.add_row(f"... {len(rows) - max_rows} more", "", "", "", "", "", "")
    return table


def snapshots_line(state) -> Text:
    """The snapshots in one line (a short terminal): the newest committed step, memory held,
    records, chunks, and the disk tier's failures."""
    held = [n.snapshot for n in state.nodes.values()]
    failing = [n for n in sorted(state.nodes) if state.nodes[n].snapshot.disk_error]
    line = Text("snapshots: " + (f"step {state.committed_step} committed" if
                                 state.committed_step >= 0 else "none committed"))  # fmt: skip
    line.append(f"  {sum(h.memory_bytes for h in held) / 2**30:.2f} GiB  "
                f"{sum(h.records for h in held)} records  {sum(h.chunks for h in held)} chunks")
    line.append(f"  disk failing on {', '.join(failing)}" if failing else "  disk ok",
                style="red" if failing else "")  # fmt: skip
    return line


def snapshots_table(state, max_rows: int = 64) -> Table:
    title = "snapshots" + (f": step {state.committed_step} committed"
                           if state.committed_step >= 0 else ": none committed")  # fmt: skip
    table = Table(title=title, title_justify="left", padding=(0, 1))
    for column, justify in (("node", "left"), ("memory", "right"), ("records", "right"),
                            ("chunks", "right"), ("disk tier", "left")):  # fmt: skip
        table.add_column(column, justify=justify, no_wrap=True)
    nodes = sorted(state.nodes, key=lambda n: (not state.nodes[n].snapshot.disk_error, n))
    for node_id in nodes[:max_rows]:
        held = state.nodes[node_id].snapshot
        table.add_row(node_id, f"{held.memory_bytes / 2**30:.2f} GiB", str(held.records),
                      str(held.chunks), held.disk_error or "ok")  # fmt: skip
    if len(nodes) > max_rows:
        total = sum(state.nodes[n].snapshot.memory_bytes for n in nodes) / 2**30
        table.add_row(f"... {len(nodes) - max_rows} more", f"{total:.0f} GiB in all", "", "", "")
    return table


def _split(details) -> str:
    """A recovery's phases in seconds, short enough for 80 columns (phases of 0 left out)."""
    parts = [(key, details.get(f"{key}_s")) for key in
             ("wait", "reform", "agree", "restore", "first_step")]  # fmt: skip
    return " ".join(f"{key.removesuffix('_step')} {value:.2f}".replace(" 0.", " .")
                    for key, value in parts
                    if isinstance(value, int | float) and round(value, 2) > 0)  # fmt: skip


def timeline(state, now: float, rows: int = TIMELINE) -> Table:
    table = Table(title="events", title_justify="left", show_header=False, padding=(0, 1),
                  expand=True)
    shown = [e for e in state.events if e.kind in SHOWN_KINDS][-rows:][::-1]  # newest first
    table.add_column("when", justify="right", no_wrap=True, min_width=6)
    table.add_column("node", no_wrap=True, min_width=max((len(e.node) for e in shown), default=4))
    table.add_column("what", no_wrap=True, min_width=max((len(SHOWN_KINDS[e.kind]) for e in shown),
                                                          default=4))  # fmt: skip
    table.add_column("detail", overflow="ellipsis", no_wrap=True, ratio=1)
    for event in shown:
        detail = event.reason
        if event.kind == "recovered":
            detail = f"r{event.details.get('rank')} {_split(event.details)}"
        table.add_row(f"-{_clock(now - event.time)}", event.node, SHOWN_KINDS[event.kind],
                      detail)  # fmt: skip
    if not shown:
        table.add_row("", "", "no events yet", "")
    return table


def sparkline(values: Sequence[float], width: int) -> Text:
    """``values`` (newest last) as bars, the newest ``width`` of them."""
    values = [v for v in values if v > 0][-width:]
    if not values:
        return Text("step time: no steps yet")
    low, high = min(values), max(values)
    span = high - low or 1.0
    bars = "".join(BARS[min(len(BARS) - 1, int((v - low) / span * len(BARS)))] for v in values)
    return Text(f"step time {low:.3f}-{high:.3f} s  ") + Text(bars)


def render(state, now: float | None = None, history: Sequence[float] = (), width: int = 80,
           height: int | None = None) -> Group:  # fmt: skip
    """The whole view of ``state`` at wall time ``now``; ``history``: step times, newest last.
    With ``height`` (a terminal's), the tables are cut to fit it."""
    now = time.time() if now is None else now
    rows = 64 if height is None else max(4, height - 24)
    short = height is not None and height < 32  # a terminal of about 24 lines
    top = [header(state, now), workers_table(state, now, rows),
           snapshots_line(state) if short else snapshots_table(state, 64 if height is None else 4)]
    spark = sparkline(history, max(10, width - 30))
    events = TIMELINE
    if height is not None:  # the events get what is left: title, two borders, the rows
        events = max(1, min(TIMELINE, height - _lines(Group(*top, spark), width) - 4))
    return Group(*top, timeline(state, now, events), spark)


def _lines(renderable, width: int) -> int:
    """How many lines ``renderable`` takes ``width`` columns wide."""
    console = Console(width=width, file=io.StringIO(), color_system=None)
    return len(console.render_lines(renderable, console.options, pad=False))
