"""The demo's views: :class:`PlainView` (plain lines) and :class:`LiveView` (``rich``), and the
closing summary both print (:func:`format_summary`).

``rich`` is imported only when a :class:`LiveView` is made or drawn, so plain output needs no more
than the library.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self, TextIO

from .._core.wire import BarReport, BeatFrame
from .demo import EXPECTED_ISSUES, DemoState
from .demo_agents import AgentView

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live

__all__ = ["LiveView", "PlainView", "format_summary"]


# --- text ----------------------------------------------------------------------------------------
def _percent(progress: float) -> str:
    return f"{progress * 100:.0f}%"


def _agent_brief(agent: AgentView) -> str:
    if agent.state in ("executing", "planning", "review"):
        return f"{agent.agent_id}={agent.state} {_percent(agent.progress)}"
    return f"{agent.agent_id}={agent.state}"


def _beat_line(state: DemoState, frame: BeatFrame) -> str:
    bpb = state.options.beats_per_bar
    measured = f"{state.measured_bpm:.1f}" if state.measured_bpm else "-"
    agents = "  ".join(_agent_brief(a) for a in state.agents)
    return (
        f"beat {frame.beat_index:>4}  bar {state.bar_of(frame.beat_index)} "
        f"{frame.beat_index % bpb + 1}/{bpb}  {frame.phase:<7}  {frame.tempo_bpm} BPM "
        f"(measured {measured})  {agents}"
    )


def _report_lines(state: DemoState, report: BarReport) -> list[str]:
    head = (
        f"bar {state.bar_of(report.from_beat)} report (beats {report.from_beat}-{report.to_beat}): "
        f"{report.agents_reporting} agents, {report.claims} claims, {report.rejected} rejected, "
        f"{report.late} late, mean progress {_percent(report.mean_progress)}"
    )
    if report.blocked:
        head += f", blocked: {', '.join(report.blocked)}"
    lines = [head]
    lines += [f"  ! {i.kind} {i.agent_id}: {i.detail}" for i in report.issues]
    if not report.issues:
        lines.append("  (no issues)")
    return lines


def format_summary(state: DemoState) -> list[str]:
    """The demo's closing summary, as plain text lines.

    Names every issue seen (the deadlock's cycle, the failure's agent and notes, the overrun) and
    says which of :data:`EXPECTED_ISSUES` never showed up.
    """
    opts = state.options
    how = "completed" if state.completed else "interrupted"
    measured = f", measured {state.measured_bpm:.1f} BPM" if state.measured_bpm else ""
    lines = [
        f"demo summary ({how}): {state.bars_seen} bars, {state.beats_seen} beats at "
        f"{opts.tempo_bpm} BPM{measured}, {len(state.agents)} agents",
    ]
    reverb = state.reverb
    if reverb is not None:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(reverb.rejection_reasons.items()))
        lines.append(
            f"claims: {reverb.claims_counted} counted, {reverb.rejected} rejected"
            + (f" ({reasons})" if reasons else "")
            + f", {reverb.claims_late} late"
        )
    if state.issues:
        lines.append("issues seen:")
        order = {kind: i for i, kind in enumerate(("deadlock", "failed", "overrun", "stalled"))}
        for issue in sorted(
            state.issues.values(), key=lambda i: (order.get(i.kind, 9), i.first_bar, i.agent_id)
        ):
            lines.append(
                f"  {issue.kind:<8} {issue.agent_id:<8} {issue.detail}  ({issue.bars_text})"
            )
    else:
        lines.append("issues seen: none")
    missing = [k for k in EXPECTED_ISSUES if not any(i.kind == k for i in state.issues.values())]
    if missing:
        lines.append(f"not seen (run more bars?): {', '.join(missing)}")
    lines.append("agents:")
    for a in state.agents:
        extra = " [beat budget exceeded]" if a.budget_exceeded else ""
        if a.undelivered:
            extra += f" [{a.undelivered} claim(s) undelivered at the stop]"
        lines.append(
            f"  {a.agent_id:<8} {a.role:<10} {a.state:<9} {_percent(a.progress):>4}  "
            f"{a.claims_sent} claims  {a.notes}{extra}".rstrip()
        )
    if state.impostor is not None:
        imp = state.impostor
        lines.append(
            f"  {imp.agent_id:<8} {imp.role:<10} sent {imp.claims_sent} claim(s) signed with a "
            f"key not on the keyring (rejected by the reverb)"
        )
    return lines


class PlainView:
    """Plain lines: one per beat, a few per bar report. For pipes, logs and ``--plain``.

    Args:
        out: where to write (flushed after every line).
    """

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def _write(self, lines: Iterable[str]) -> None:
        for line in lines:
            self._out.write(line + "\n")
        self._out.flush()

    def started(self, state: DemoState) -> None:
        """Print what runs where."""
        opts = state.options
        names = ", ".join(f"{a.agent_id} ({a.role})" for a in state.agents)
        self._write(
            [
                f"nats-server at {state.nats_url}; cluster {opts.cluster_id!r}; pulse at "
                f"{opts.tempo_bpm} BPM, {opts.beats_per_bar}/bar; reverb verifying signatures",
                f"agents: {names}",
                *([f"dashboard: {state.web_url}"] if state.web_url else []),
            ]
        )

    def beat(self, state: DemoState, frame: BeatFrame) -> None:
        """Print one beat line."""
        self._write([_beat_line(state, frame)])

    def report(self, state: DemoState, report: BarReport) -> None:
        """Print the report and its issues."""
        self._write(_report_lines(state, report))

    def summary(self, state: DemoState) -> None:
        """Print the closing summary."""
        self._write(["", *format_summary(state)])


_STATE_STYLE: Final = {
    "starting": "dim",
    "planning": "cyan",
    "executing": "blue",
    "waiting": "yellow",
    "review": "magenta",
    "done": "green",
    "failed": "bold red",
}
_ISSUE_STYLE: Final = {
    "deadlock": "bold red",
    "failed": "red",
    "overrun": "yellow",
    "stalled": "magenta",
}


class LiveView:
    """A ``rich`` live view: beat, tempo, every agent's state and progress, the latest issues.

    Use it as a context manager around :func:`run_demo`; it redraws on every beat and report.

    Args:
        console: the ``rich`` console to draw on.
    """

    def __init__(self, console: Console) -> None:
        from rich.live import Live

        self.console = console
        self._state: DemoState | None = None
        self._live: Live = Live(
            console=console, auto_refresh=False, transient=False, redirect_stderr=False
        )

    def __enter__(self) -> Self:
        self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state is not None:
            self._live.update(self.render(self._state), refresh=True)
        self._live.__exit__(exc_type, exc, tb)

    def started(self, state: DemoState) -> None:
        """Draw the first frame."""
        self._state = state
        self._live.update(self.render(state), refresh=True)

    def beat(self, state: DemoState, frame: BeatFrame) -> None:
        """Redraw."""
        self._state = state
        self._live.update(self.render(state), refresh=True)

    def report(self, state: DemoState, report: BarReport) -> None:
        """Redraw."""
        self._state = state
        self._live.update(self.render(state), refresh=True)

    def render(self, state: DemoState) -> RenderableType:
        """The whole view, for the current state."""
        from rich import box
        from rich.console import Group
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        opts = state.options
        frame = state.frame
        head = Text()
        if frame is None:
            head.append("waiting for the first beat…", style="dim")
        else:
            bpb = opts.beats_per_bar
            head.append(f"bar {state.bar_of(frame.beat_index)}", style="bold")
            head.append(f"  beat {frame.beat_index % bpb + 1}/{bpb}", style="bold")
            head.append(f"  (#{frame.beat_index})  phase ")
            head.append(frame.phase, style="bold cyan")
            head.append(f"   tempo {frame.tempo_bpm} BPM")
            if state.measured_bpm:
                head.append(f" (measured {state.measured_bpm:.1f})", style="dim")
        reverb = state.reverb
        if reverb is not None:
            head.append(
                f"\nbar reports {state.bars_seen}"
                + (f"/{opts.bars}" if opts.bars else "")
                + f"   claims counted {reverb.claims_counted}   rejected {reverb.rejected}"
                f"   late {reverb.claims_late}"
            )
        where = state.nats_url + (f" · dashboard {state.web_url}" if state.web_url else "")
        header = Panel(head, title=f"BACKBEAT demo · cluster {opts.cluster_id}", subtitle=where)

        agents = Table(box=box.SIMPLE_HEAD, expand=True)
        agents.add_column("agent", no_wrap=True)
        agents.add_column("life", no_wrap=True)
        agents.add_column("state", no_wrap=True)
        agents.add_column("progress", no_wrap=True)
        agents.add_column("left", justify="right", no_wrap=True)
        agents.add_column("claims", justify="right", no_wrap=True)
        agents.add_column("notes", ratio=1, no_wrap=True, overflow="ellipsis", min_width=12)
        for a in state.agents:
            progress = Table.grid(padding=(0, 1))
            progress.add_row(
                ProgressBar(total=1.0, completed=a.progress, width=12),
                Text(_percent(a.progress), justify="right"),
            )
            notes = a.notes + (" [budget exceeded]" if a.budget_exceeded else "")
            agents.add_row(
                Text(a.agent_id),
                a.role,
                Text(a.state, style=_STATE_STYLE.get(a.state, "")),
                progress,
                str(a.beats_left) if a.claims_sent else "",
                str(a.claims_sent),
                Text(notes),
            )

        issues = Table(box=box.SIMPLE_HEAD, expand=True, title_justify="left")
        report = state.latest_report
        issues.title = (
            "latest bar report: none yet"
            if report is None
            else f"issues in bar {state.bar_of(report.from_beat)}'s report "
            f"({report.claims} claims, {report.agents_reporting} agents)"
        )
        issues.add_column("issue", no_wrap=True)
        issues.add_column("agent", no_wrap=True)
        issues.add_column("detail", ratio=1)
        for issue in report.issues if report is not None else []:
            issues.add_row(
                Text(issue.kind, style=_ISSUE_STYLE.get(issue.kind, "")),
                Text(issue.agent_id),
                Text(issue.detail),
            )
        if report is not None and not report.issues:
            issues.add_row(Text("none", style="green"), "", "")
        return Group(header, agents, issues)

    def summary(self, state: DemoState) -> None:
        """Print the closing summary below the view."""
        from rich.text import Text

        self.console.print()
        for line in format_summary(state):
            style = ""
            stripped = line.lstrip()
            for kind, kind_style in _ISSUE_STYLE.items():
                if stripped.startswith(kind + " "):
                    style = kind_style
            self.console.print(Text(line, style=style))
