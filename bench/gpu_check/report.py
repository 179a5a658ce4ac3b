"""The report of ``python -m bench.gpu_check``: stage statuses, sections and CSV rows, rewritten after every stage."""
from __future__ import annotations

import csv
import datetime
import platform
import subprocess
import time
from pathlib import Path

import torch

from bench.gpu_check.common import ROOT, STAGES

class Report:
    """Stage results, tables and CSV rows, written to ``out`` after every stage (and on every :meth:`write`)."""

    def __init__(self, out: Path, command: str, budget_s: float) -> None:
        self.out, self.command, self.budget_s = out, command, budget_s
        self.start = time.monotonic()
        self.stamp = _stamp(command)
        self.stages = {name: ("not reached", "") for name in STAGES}
        self.sections = {name: [] for name in STAGES}
        self.csv = {}
        out.mkdir(parents=True, exist_ok=True)

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def out_of_time(self, reserve_s: float = 0.0) -> bool:
        return self.left_s() <= reserve_s

    def rows(self, name: str, rows: list[dict]) -> None:
        """Add rows to ``DIR/<name>.csv`` (each stamped with device, versions, date and command)."""
        self.csv.setdefault(name, []).extend(dict(r, **self.stamp) for r in rows)

    def set(self, stage: str, status: str, summary: str, lines: list[str] | None = None) -> None:
        self.stages[stage] = (status, summary)
        if lines is not None:
            self.sections[stage] = lines
        self.write()

    def write(self) -> None:
        s = self.stamp
        lines = [f"# pyfused GPU check: {s['device']}", "",
                 f"`{s['command']}` on {s['date']} — torch {s['torch']}, triton {s['triton']}, "
                 f"CUDA {s['cuda']}, driver {s['driver']}, pyfused {s['commit']}; budget {self.budget_s:g} s, "
                 f"{time.monotonic() - self.start:.0f} s used.", "",
                 "| stage | status | summary |", "|---|---|---|"]
        lines += [f"| {i}. {name} | {status} | {summary} |"
                  for i, (name, (status, summary)) in enumerate(self.stages.items(), 1)]
        for i, name in enumerate(STAGES, 1):
            if self.sections[name]:
                lines += ["", f"## {i}. {name}", "", *self.sections[name]]
        (self.out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for name, rows in self.csv.items():
            columns = list(dict.fromkeys(k for r in rows for k in r))
            with open(self.out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, columns)
                writer.writeheader()
                writer.writerows(rows)


def _git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (done.stdout.strip() or "?") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def nvidia_smi(fields: str) -> list[str] | None:
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0 or not done.stdout.strip():
        return None
    return [v.strip() for v in done.stdout.splitlines()[0].split(",")]


def _stamp(command: str) -> dict:
    import triton

    cuda = torch.cuda.is_available()
    smi = nvidia_smi("driver_version") if cuda else None
    return dict(device=torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda or "-",
                driver=smi[0] if smi else "-", commit=_git_commit(), command=command,
                date=datetime.datetime.now().isoformat(timespec="seconds"))


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


