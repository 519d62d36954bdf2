"""The W&B SDK side of :class:`corebus.integrations.wandb.WandbLogger`: records -> SDK calls,
in a child process (:class:`corebus.BackendProcess`) or on the sink's worker thread."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("corebus")

LEVELS = {"info": "INFO", "warning": "WARN", "error": "ERROR"}


class RunWriter:
    """Records -> W&B SDK calls for one run, on the sink's worker thread or in a child process
    (:class:`corebus.BackendProcess`)."""

    def __init__(
        self,
        project: str,
        entity: str | None,
        mode: str,
        dir: str,
        name: str | None,
        tags: list[str],
        run_id: str,
        stats_pid: int | None = None,
        program: str | None = None,
    ):
        import wandb

        self._wandb = wandb
        process = {"x_stats_pid": stats_pid or os.getpid()}
        if program:
            process["program"] = program
        self.settings = {
            "project": project,
            "entity": entity,
            "mode": mode,
            "dir": dir,
            "name": name,
            "tags": tags or None,
            "id": run_id,
            "settings": wandb.Settings(**process),
        }
        self.run_id, self.mode, self.dir = run_id, mode, dir
        self.run: Any = None
        self._lock = threading.Lock()  # the start helper and the sink's worker may both open

    def open(self) -> None:
        """Start the run now (its runtime counts from here)."""
        self._open()

    def _open(self) -> Any:
        with self._lock:
            if self.run is None:
                start = time.perf_counter()
                self.run = self._wandb.init(**self.settings, resume="allow", reinit="create_new")
                log.info("WandbLogger: wandb.init took %.2f s (run %s)", time.perf_counter() - start, self.run_id)
            return self.run

    def send(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            run, kind = self._open(), record["type"]
            if kind == "log":
                run.log(record["values"], step=record["step"])
            elif kind == "config":
                run.config.update(record["values"], allow_val_change=True)
                if record.get("resumed_step") is not None:
                    run.summary["corebus/resumed_at_step"] = record["resumed_step"]
            elif kind == "artifact":
                self._send_artifact(run, record)
            elif kind == "summary":
                run.summary.update(record["values"])
            elif kind == "alert":
                alert = {k: record[k] for k in ("kind", "title", "text", "level", "step", "epoch", "time")}
                run.summary["alerts"] = list(run.summary.get("alerts") or []) + [alert]
                if self.mode == "online":
                    run.alert(
                        title=record["title"][:63],
                        text=record["text"] or record["title"],
                        level=LEVELS[record["level"]],
                    )
            elif kind == "finish":
                run.summary["corebus/status"] = record["status"]
                if record.get("error"):
                    run.summary["corebus/exception"] = record["error"]
                run.finish(exit_code=record["exit_code"])
                self.run = None
                shutil.rmtree(Path(self.dir) / f"wandb-{self.run_id}.staging", ignore_errors=True)

    def _send_artifact(self, run: Any, record: dict[str, Any]) -> None:
        path = Path(record["path"])
        if not path.exists():  # retrying cannot bring it back
            log.warning("WandbLogger: checkpoint %s no longer exists; not uploaded", path)
            return
        artifact = self._wandb.Artifact(f"run_{self.run_id}_model", type="model", metadata=record["metadata"])
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path), name=record["name"])
        run.log_artifact(artifact, aliases=record.get("aliases") or ["latest", f"step_{record['step']}"])
        if record["staged"]:
            path.unlink(missing_ok=True)  # add_file copied it into W&B's own staging area


class InThread:
    """The writer's ``call``/``close`` interface in this process (the sink's worker thread
    calls it), where a test can patch ``wandb``."""

    def __init__(self, writer: RunWriter):
        self.writer = writer

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.writer, method)(*args)

    def close(self, timeout: float = 5.0) -> None:
        """Nothing to stop."""
